"""Training on several GPUs or machines with ``tf.distribute``.

``train(..., strategy=...)`` (``malaria-cells train --strategy ...``) takes one of
:data:`STRATEGIES` or a ready ``tf.distribute.Strategy``:

``default``
    No distribution: the single-process path, unchanged.
``mirrored``
    ``tf.distribute.MirroredStrategy``: one process, a replica on every local GPU (or the
    CPU when there is none); gradients are summed across replicas each step.
``multi-worker``
    ``tf.distribute.MultiWorkerMirroredStrategy``: one process per machine (or per GPU),
    each started with the same command and its own ``TF_CONFIG`` environment variable,
    for example ``{"cluster": {"worker": ["host1:12345", "host2:12345"]},
    "task": {"type": "worker", "index": 0}}``.

The batch size is global: ``batch_size`` cells per step across all replicas, each replica
taking ``batch_size / replicas``; so a recipe means the same (learning rate, steps per epoch,
schedule) whatever the number of replicas. Every worker reads the whole dataset and
tf.data's DATA auto-sharding hands each its share of every batch. Only the chief (task
``chief``, else ``worker`` 0) writes the run folder; the other workers write their copies of
the checkpoints to a temporary folder that is deleted, as the TensorFlow multi-worker Keras
guide does. See ``docs/distributed-training.md``.
"""

from __future__ import annotations

import json
import os

from .errors import MalariaCellsError

__all__ = ["STRATEGIES", "check_tf_config", "check_global_batch", "make_strategy", "is_chief", "worker_count", "shard_by_data",
           "build_on_local_batch"]

STRATEGIES = ("default", "mirrored", "multi-worker")
"""The strategy names ``train`` and ``malaria-cells train --strategy`` accept."""


def check_tf_config(environ=None) -> dict:
    """The ``TF_CONFIG`` of a multi-worker run, checked, or one line saying what is wrong.

    Parameters
    ----------
    environ : mapping, optional
        Where to read ``TF_CONFIG`` from (default: ``os.environ``).

    Returns
    -------
    dict
        The parsed ``TF_CONFIG`` (``cluster``: task type to ``host:port`` list; ``task``:
        this process's ``type`` and ``index``).

    Raises
    ------
    MalariaCellsError
        When it is missing, not JSON, has no ``cluster`` or ``task``, or the task's type or
        index is not in the cluster.
    """
    environ = os.environ if environ is None else environ
    text = environ.get("TF_CONFIG")
    if not text or not text.strip():
        raise MalariaCellsError("--strategy multi-worker needs the TF_CONFIG environment variable "
                                "(cluster and task; see docs/distributed-training.md)")
    try:
        config = json.loads(text)
    except ValueError as error:
        raise MalariaCellsError(f"TF_CONFIG is not JSON ({error})") from None
    if not isinstance(config, dict):
        raise MalariaCellsError("TF_CONFIG must be a JSON object with 'cluster' and 'task'")
    cluster, task = config.get("cluster"), config.get("task")
    if not isinstance(cluster, dict) or not cluster:
        raise MalariaCellsError("TF_CONFIG has no 'cluster' (a mapping such as {\"worker\": [\"host:port\", ...]})")
    for kind, addresses in cluster.items():
        if not isinstance(addresses, list) or not addresses or not all(isinstance(a, str) and a for a in addresses):
            raise MalariaCellsError(f"TF_CONFIG cluster {kind!r} must be a non-empty list of 'host:port' strings")
    if not isinstance(task, dict) or "type" not in task or "index" not in task:
        raise MalariaCellsError("TF_CONFIG has no 'task' with 'type' and 'index' (which of the cluster's tasks this is)")
    kind, index = task["type"], task["index"]
    if kind not in cluster:
        raise MalariaCellsError(f"TF_CONFIG task type {kind!r} is not in the cluster ({', '.join(cluster)})")
    if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < len(cluster[kind]):
        raise MalariaCellsError(f"TF_CONFIG task index {index!r} is out of range: cluster {kind!r} has "
                                f"{len(cluster[kind])} task(s), indices 0 to {len(cluster[kind]) - 1}")
    return config


def make_strategy(strategy=None):
    """A ``tf.distribute.Strategy`` for a name of :data:`STRATEGIES` (None for ``default``).

    Parameters
    ----------
    strategy : str, tf.distribute.Strategy or None
        ``None`` or ``"default"``: no distribution (returns None). ``"mirrored"``: all
        local GPUs, or the CPU. ``"multi-worker"``: the cluster in ``TF_CONFIG`` (checked
        first by :func:`check_tf_config`). A Strategy is returned as it is (for instance a
        ``MultiWorkerMirroredStrategy`` built on a ``SlurmClusterResolver``).

    Returns
    -------
    tf.distribute.Strategy or None
    """
    if strategy is None or strategy == "default":
        return None
    if not isinstance(strategy, str):
        import tensorflow as tf

        if not isinstance(strategy, tf.distribute.Strategy):
            raise MalariaCellsError(f"strategy must be one of {', '.join(STRATEGIES)} or a tf.distribute.Strategy, "
                                    f"got {type(strategy).__name__}")
        return strategy
    if strategy not in STRATEGIES:
        raise MalariaCellsError(f"unknown strategy {strategy!r}: choose from {', '.join(STRATEGIES)}")
    if strategy == "multi-worker":
        check_tf_config()
    import tensorflow as tf

    if strategy == "mirrored":
        return tf.distribute.MirroredStrategy()
    return tf.distribute.MultiWorkerMirroredStrategy()


def check_global_batch(batch_size: int, replicas: int) -> int:
    """``batch_size`` (global: cells per step over all replicas) per replica, or one line
    saying it does not split evenly between the ``replicas``."""
    if batch_size % replicas:
        raise MalariaCellsError(f"batch size {batch_size} is global: it must be a multiple of the {replicas} replicas")
    return batch_size // replicas


def _task(strategy) -> tuple[str | None, int | None, dict]:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None:
        return None, None, {}
    spec = resolver.cluster_spec().as_dict() if resolver.cluster_spec() else {}
    return resolver.task_type, resolver.task_id, spec


def is_chief(strategy) -> bool:
    """Whether this process writes the run folder: no strategy or a single-machine one, the
    ``chief`` task, or ``worker`` 0 of a cluster without a chief."""
    if strategy is None:
        return True
    kind, index, cluster = _task(strategy)
    if kind is None or not cluster:
        return True
    return kind == "chief" or (kind == "worker" and index == 0 and "chief" not in cluster)


def worker_count(strategy) -> int:
    """How many processes train together (1 without a cluster)."""
    if strategy is None:
        return 1
    _, _, cluster = _task(strategy)
    return max(1, sum(len(cluster.get(kind, [])) for kind in ("chief", "worker")))


def shard_by_data(dataset):
    """``dataset`` with auto-sharding set to DATA: every worker reads all of it and keeps its
    share of each batch (the arrays are in memory, there are no files to shard)."""
    import tensorflow as tf

    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return dataset.with_options(options)



def build_on_local_batch(model, strategy) -> None:
    """Work around Keras 3's ``fit`` under a strategy of several workers (keras-team/keras#20585).

    Two steps of Keras 3.15's TensorFlow trainer fail once there is more than one worker:

    - before training, ``fit`` builds the model (optimizer and metric variables) from its first
      batch, averaged across replicas with ``strategy.reduce``, which cannot take an ``(x, y)``
      pair; only shapes matter, so the model is built from this worker's first replica's part;
    - each step's logs (scalar loss and metrics) are averaged with ``strategy.reduce(...,
      axis=0)``, which fails on a scalar; scalars are averaged across replicas instead
      (``axis=None``), everything else as Keras does.

    Nothing changes for a single worker or without a strategy.
    """
    if strategy is None or worker_count(strategy) < 2:
        return
    import tensorflow as tf

    def local(value):
        return strategy.experimental_local_results(value)[0] if isinstance(value, tf.distribute.DistributedValues) \
            else value

    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(local, next(batches))
                break
        with strategy.scope():
            model._symbolic_build(data_batch=data_batch)

    model._maybe_symbolic_build = build
    _average_scalar_logs()


def _average_scalar_logs() -> None:
    """Patch Keras' TensorFlow trainer (once) to average scalar step outputs across workers."""
    import tensorflow as tf
    from keras.src.backend.tensorflow import trainer

    original = trainer.reduce_per_replica
    if getattr(original, "malaria_cells_patch", False):
        return

    def reduce_per_replica(values, strategy, reduction):
        if reduction not in ("auto", "mean") or not hasattr(strategy, "cluster_resolver") \
                or worker_count(strategy) < 2:
            return original(values, strategy, reduction)

        def reduce(value):
            local = strategy.experimental_local_results(value)[0] \
                if isinstance(value, tf.distribute.DistributedValues) else value
            if tf.is_tensor(local) and local.shape.rank == 0:
                return strategy.reduce("MEAN", value, axis=None)
            return original(value, strategy, reduction)

        return tf.nest.map_structure(reduce, values)

    reduce_per_replica.malaria_cells_patch = True
    trainer.reduce_per_replica = reduce_per_replica
