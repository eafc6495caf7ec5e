"""Can growing the batch size replace decaying the learning rate?

A tracked, schedule-driven Keras training project reproducing Smith, Kindermans, Ying & Le,
"Don't Decay the Learning Rate, Increase the Batch Size" (arXiv 1711.00489, ICLR 2018).

Modules, in the order data flows through them:
    presets    the paper's and the reproduction's experiments by name (no TensorFlow)
    config     the Config dataclass, each field's check, the cross-field rules, the command line (no TensorFlow)
    schedules  every schedule as a pure function of the epoch, update counts, the noise scale (no TensorFlow)
    data       loading (restricted unpickling), validation split, augmentation and the per-epoch batches
    models     the reproduction's small CNN, the 16-4 wide ResNet, ghost batch norm, optimizers
    loop       the Trainer: the callback-driven loop, its one train step, evaluation, the schedule callback
    noise      the gradient noise scale: the estimator (no TensorFlow), its probe and meter
    checkpoint Keras-native per-epoch checkpoints, their callback, and the run's lock
    metrics    the names of the per-epoch metrics (no TensorFlow)
    tracking   the run's lifecycle and status, and everything else that talks to MLflow during a run
    errors     one-line errors (no TensorFlow)
    distribute devices and tf.distribute strategies
    plots      matplotlib figures (no TensorFlow)
    analysis   reading runs back from a tracking store: tidy tables, summaries (no TensorFlow)
    train      the `main` entry point: one run, or the resumption of a stopped one; signals
    sweep      the `sweep` entry point: experiments x seeds as child runs, resumable
    report     the `report` entry point: the analysis notebook, executed headless
    bench      the `bench` entry point: the loop against Keras fit
"""

__version__ = "0.1.0"
