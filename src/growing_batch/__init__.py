"""Can growing the batch size replace decaying the learning rate?

A tracked, schedule-driven Keras training project reproducing Smith, Kindermans, Ying & Le,
"Don't Decay the Learning Rate, Increase the Batch Size" (arXiv 1711.00489, ICLR 2018).

Modules, in the order data flows through them:
    presets    the paper's and the reproduction's experiments by name (no TensorFlow)
    config     the Config dataclass, its validation and command line (no TensorFlow)
    schedules  every schedule as a pure function of the epoch, and the noise scale (no TensorFlow)
    data       loading, validation split, augmentation and the per-epoch batches
    models     the reproduction's small CNN, the 16-4 wide ResNet, ghost batch norm, optimizers
    loop       the callback-driven training loop, the schedule and checkpoint callbacks, the compiled
               train step, divergence and signal handling
    checkpoint the per-epoch checkpoint of a run and its lock (no TensorFlow)
    metrics    the names of the per-epoch metrics (no TensorFlow)
    tracking   everything that talks to MLflow during a run
    errors     one-line errors and FAILED runs (no TensorFlow)
    plots      matplotlib figures (no TensorFlow)
    analysis   reading runs back from a tracking store: tidy tables, summaries (no TensorFlow)
    train      the `main` entry point: one run, or the resumption of a stopped one
    sweep      the `sweep` entry point: experiments x seeds as child runs, resumable
    report     the `report` entry point: the analysis notebook, executed headless
    bench      the `bench` entry point: the loop against Keras fit
"""

__version__ = "0.1.0"
