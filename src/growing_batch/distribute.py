"""Data-parallel training: TensorFlow's own engine, ``tf.distribute``, or Keras' distribution API on JAX.

``devices`` (a config field) chooses the replicas of one machine:

* ``auto`` — every visible GPU (one replica each); on a machine without GPUs, the CPU as one device;
* a number N — the first N GPUs; on a machine without GPUs, N > 1 splits the CPU into N logical
  devices (``tf.config.set_logical_device_configuration``), which is how tests and CI exercise it.

More than one replica trains under ``tf.distribute.MirroredStrategy``. With ``TF_CONFIG`` naming a
cluster of several tasks, training runs under ``tf.distribute.MultiWorkerMirroredStrategy`` instead
(every worker runs the same command; each uses all its local GPUs, or its CPU) and only the chief
logs to MLflow (:func:`is_chief`).

The schedule's batch size is the global batch: each step's batch is gathered once and split as
evenly as possible over all replicas (sizes differ by at most one example, or one ghost batch with
ghost batch norm: see :meth:`growing_batch.tf_engine.TrainStep._replica_share`); each replica's loss is
its examples' summed loss over the *global* batch size, and the optimizer sums the replicas'
gradients, so an update is the mean gradient over the whole batch, as on one device.

Logical CPU devices can only be made before TensorFlow starts its runtime: :func:`make_strategy` is
called first thing in a training process.

On JAX (``backend=jax``), several devices train under Keras' own
``keras.distribution.DataParallel`` over the local JAX devices (GPUs; on a CPU, the devices that
``XLA_FLAGS=--xla_force_host_platform_device_count=N`` makes): weights and the data splits are
replicated, every padded batch is sharded over the devices along its examples, and XLA sums the
gradients, so an update is again the mean gradient over the whole batch, and ghost batches are those
of one device. ``auto`` there means every GPU, or one CPU device. Multi-host JAX (``TF_CONFIG`` or
``jax.distributed``) is not supported yet.
"""

from __future__ import annotations

import json
import os

from growing_batch.config import ConfigError


def cluster() -> dict | None:
    """The cluster of ``TF_CONFIG`` when it names more than one task, else None."""
    text = os.environ.get("TF_CONFIG", "").strip()
    if not text:
        return None
    try:
        config = json.loads(text)
        tasks = sum(len(addresses) for addresses in config["cluster"].values())
        config["task"]["type"], int(config["task"]["index"])
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"TF_CONFIG={text[:200]!r} is not allowed: expected JSON with 'cluster' (task type -> addresses) and "
            f"'task' ({{'type': ..., 'index': ...}}), as tf.distribute reads it ({error})."
        ) from None
    return config if tasks > 1 else None


def is_chief() -> bool:
    """Whether this process logs the run: the only process, or the cluster's chief (else worker 0)."""
    config = cluster()
    if config is None:
        return True
    task = config["task"]
    if "chief" in config["cluster"]:
        return task["type"] == "chief"
    return task["type"] == "worker" and int(task["index"]) == 0


def parse_devices(text: str) -> int | None:
    """``auto`` -> None, else the number of devices (the config has checked it: growing_batch.config)."""
    return None if text == "auto" else int(text)


def import_tensorflow():
    """TensorFlow, imported with its own start-up logging silenced unless the user set
    ``TF_CPP_MIN_LOG_LEVEL`` (then as they set it): the native library writes its banner (twice) to
    the standard error before its log level applies, so that is muted for the import, and the level
    becomes 3, which also hides the ``cuInit`` error of a machine without a GPU."""
    import sys

    if "tensorflow" in sys.modules or "TF_CPP_MIN_LOG_LEVEL" in os.environ:
        import tensorflow

        return tensorflow
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    sys.stderr.flush()
    saved, muted = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(muted, 2)
        import tensorflow
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(muted)
    return tensorflow


def make_strategy(devices: str, backend: str = "tensorflow"):
    """The ``tf.distribute`` strategy for ``devices`` (see the module); the default one for one device.

    With ``backend`` jax: None for one device, else a ``keras.distribution.DataParallel`` over the
    first N local JAX devices, set as Keras' distribution for the process (:func:`jax_distribution`).
    """
    if backend == "jax":
        if cluster() is not None:
            raise ConfigError("backend='jax' is not allowed with TF_CONFIG: expected tensorflow for a cluster of "
                              "several workers (multi-host JAX is not supported yet).")
        if tensorflow_installed():
            # Keras' JAX backend may still import an installed TensorFlow (its data adapters): keep it off the GPUs
            try:
                import_tensorflow().config.set_visible_devices([], "GPU")
            except RuntimeError:  # TensorFlow's runtime already started in this process
                pass
        return jax_distribution(devices)
    tf = import_tensorflow()

    requested = parse_devices(devices)
    if cluster() is not None:
        if requested not in (None, 1) and not tf.config.list_physical_devices("GPU"):
            raise ConfigError(
                f"devices={devices!r} is not allowed with TF_CONFIG on a machine without GPUs: expected auto "
                "(each worker trains on its CPU as one device)."
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        count = len(gpus) if requested is None else requested
        if count > len(gpus):
            raise ConfigError(f"devices={devices!r} is not allowed: expected at most the {len(gpus)} visible GPUs.")
        if count == 1:
            return tf.distribute.get_strategy()
        return tf.distribute.MirroredStrategy([f"/gpu:{index}" for index in range(count)])
    count = requested or 1
    if count == 1:
        return tf.distribute.get_strategy()
    cpus = tf.config.list_physical_devices("CPU")
    try:  # listing the logical devices would start the runtime: try first
        tf.config.set_logical_device_configuration(cpus[0], [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise ConfigError(
                f"devices={devices!r} is not allowed in this process: TensorFlow already started with "
                f"{len(tf.config.list_logical_devices('CPU'))} CPU device(s); choose devices before TensorFlow "
                "starts (a new process, e.g. python -m growing_batch.train --devices N)."
            ) from None
    return tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(count)])


def tensorflow_installed() -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec("tensorflow") is not None
    except (ImportError, ValueError):
        return False


def jax_distribution(devices: str):
    """None (one device), or ``keras.distribution.DataParallel`` over the first N local JAX devices,
    made Keras' distribution for this process (before the model and the data splits are made)."""
    import jax
    import keras

    local = jax.local_devices()
    on_gpu = local[0].platform != "cpu"
    requested = parse_devices(devices)
    count = (len(local) if on_gpu else 1) if requested is None else requested
    if count > len(local):
        hint = ("" if on_gpu else f"; on a CPU, set XLA_FLAGS=--xla_force_host_platform_device_count={count} "
                "before the process starts to make that many")
        raise ConfigError(f"devices={devices!r} is not allowed with backend jax: expected at most the {len(local)} "
                          f"local JAX device(s) ({local[0].platform}){hint}.")
    if count == 1:
        return None
    distribution = keras.distribution.DataParallel(devices=local[:count])
    keras.distribution.set_distribution(distribution)
    return distribution


def replica_count(strategy) -> int:
    if strategy is None:
        return 1
    if hasattr(strategy, "device_mesh"):  # keras.distribution.DataParallel (JAX)
        return int(strategy.device_mesh.devices.size)
    return int(strategy.num_replicas_in_sync)


def describe(strategy) -> str:
    """``one-device``, ``MirroredStrategy``, ``MultiWorkerMirroredStrategy`` or (JAX) ``DataParallel``
    (the run's tag ``distribution``)."""
    if strategy is None:  # one device
        return "one-device"
    if hasattr(strategy, "device_mesh"):
        return "DataParallel"
    import tensorflow as tf

    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "MultiWorkerMirroredStrategy"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "MirroredStrategy"
    return "one-device"
