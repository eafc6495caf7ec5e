"""Can growing the batch size replace decaying the learning rate?

A tracked, schedule-driven Keras training project reproducing Smith, Kindermans, Ying & Le,
"Don't Decay the Learning Rate, Increase the Batch Size" (arXiv 1711.00489, ICLR 2018).

Modules, in the order data flows through them:
    config     the Config dataclass, its validation and command line (no TensorFlow)
    schedules  every schedule as a pure function of the epoch, and the noise scale (no TensorFlow)
    data       loading, validation split and the per-epoch batched pipeline
    models     the reproduction's small CNN
    loop       the callback-driven training loop and the schedule callback
    tracking   everything that talks to MLflow during a run
    plots      matplotlib figures (no TensorFlow)
    analysis   reading runs back from a tracking store (no TensorFlow)
    train      the `main` entry point
"""

__version__ = "0.1.0"
