"""Screening many samples beyond one process: the samples of a screen spread over Dask workers.

:func:`screen_distributed` hands each **sample** (all its fields) to a worker of a Dask
distributed cluster, a local one of worker processes by default or one already running
(``scheduler="tcp://host:8786"``). A sample is the unit of work because its fields are not
independent: the duplicate-field check compares each field with the sample's earlier ones,
and pooling (counts, interval, call) needs all of them. Each worker runs exactly the loop a
single process runs (:meth:`~.screener.Screener.screen_samples`) on its sample, so the counts
and calls are the same, and the client only puts the samples back in input order.

Each worker builds its :class:`~.screener.Screener` once, when it joins (a Dask worker
plugin): the model is sent to a worker once, never with each task, and a worker that replaces
one that died builds its own. Samples come back as they finish (``on_sample``: the command
line records each in the database then). A worker that dies mid-sample has that sample
rescheduled by Dask (``retries``); a sample that still cannot be screened is reported in
``skipped`` with the reason, and the others go on.

Workers read the field files themselves: with a cluster of several machines, give paths that
every worker can read (a shared file system), absolute or relative to the workers' folder.
This module imports ``distributed``; ``import malaria_cells.fields`` does not.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import uuid
from collections.abc import Callable

from distributed import WorkerPlugin

from ..errors import MalariaCellsError
from .gallery import Gallery
from .report import ReportWriter, field_pictures
from .results import ScreenResult
from .screener import Screener, group_samples

__all__ = ["OnSample", "ScreenerPlugin", "ScreenerUnavailable", "screen_distributed"]

OnSample = Callable[[ScreenResult], None]
"""Called with each sample as it finishes: a :class:`~.results.ScreenResult` of that sample
alone (its fields, the sample as its one sample and summary, its skipped fields, the model)."""

_SCREENER_PARAMETERS = frozenset(inspect.signature(Screener).parameters)


class ScreenerUnavailable(MalariaCellsError):
    """A worker could not build its screener (a missing or unreadable model, bad options)."""


class ScreenerPlugin(WorkerPlugin):
    """A Dask worker plugin that builds one :class:`~.screener.Screener` per worker process.

    Parameters
    ----------
    options : dict
        Keyword arguments of :class:`~.screener.Screener` (``classifier``, ``threshold``, ...).

    The plugin (with its options) travels to each worker once, when it joins; the scheduler
    gives it to workers that join later, such as one started in place of a worker that died.
    A screener that cannot be built is kept as the reason, raised by each task as
    :class:`ScreenerUnavailable`.
    """

    def __init__(self, options: dict):
        self.options = dict(options)
        self.screener: Screener | None = None
        self.error: str | None = None

    def setup(self, worker) -> None:
        try:
            self.screener = Screener(**self.options)
        except Exception as error:  # noqa: BLE001 - reported to the client by each task, as one line
            self.error = _one_line(error)


def screen_distributed(paths_or_samples, *, client=None, scheduler: str | None = None, workers: int = 2,
                       screener_options: dict | None = None, truth: str | os.PathLike | bool | None = None,
                       gallery: Gallery | None = None, report: ReportWriter | None = None,
                       on_sample: OnSample | None = None, progress: Callable[[int], None] | None = None,
                       retries: int = 2) -> ScreenResult:
    """Screen samples in parallel on Dask distributed: one task per sample.

    Parameters
    ----------
    paths_or_samples : path, iterable of paths, or iterable of ``(name, fields)``
        Field images or folders (each folder one sample, loose files one more, as
        :meth:`~.screener.Screener.screen`), or samples as
        :meth:`~.screener.Screener.screen_samples` takes them: ``fields`` are paths, or
        ``(path, read)`` / ``(path, read, truth)`` tuples whose callables can be pickled.
    client : distributed.Client, optional
        A client of a running cluster to use (left open).
    scheduler : str, optional
        Address of a running scheduler (``"tcp://host:8786"``); a client to it is opened and
        closed here. Without ``client`` or ``scheduler``, a local cluster of ``workers`` worker
        processes (one thread each) is started and closed here.
    workers : int
        Worker processes of the local cluster (default 2).
    screener_options : dict, optional
        Keyword arguments of :class:`~.screener.Screener`, the same on every worker (default:
        the shipped field model). A classifier given as an object must pickle.
    truth : path or True, optional
        Ground truth, as :meth:`~.screener.Screener.screen` takes it (for path inputs).
    gallery : Gallery, optional
        Filled with each sample's gallery as it arrives (a worker keeps it while screening),
        for :meth:`malaria_cells.records.Records.add`.
    report : ReportWriter, optional
        A report folder being written: each worker draws its fields' overlays and sends them
        back with its sample, and the report's gallery is filled (``gallery`` must then be
        that gallery, or None). Call its ``finish`` with the result afterwards.
    on_sample : callable, optional
        Called with each sample as it finishes, in the order they finish (see :data:`OnSample`);
        an exception from it ends the screen (the cluster is closed) and is raised.
    progress : callable, optional
        Called with the number of fields of each sample as it finishes (a progress bar's ``update``).
    retries : int
        Times a sample is tried again after its task failed or its worker died (default 2).
        With a local cluster this is also the scheduler's ``allowed-failures``; a running
        scheduler keeps its own setting for workers that die. Dask counts a worker's death
        against every sample assigned to it then: with few samples (up to twice the workers)
        a sample may wait on a worker behind another, so one sample that kills its worker on
        every try can take a neighbour with it once the retries are spent.

    Returns
    -------
    ScreenResult
        Fields and samples in input order, as :meth:`~.screener.Screener.screen` gives them;
        a sample that could not be screened even after its retries is in ``skipped`` as
        ``(sample name, reason)``.

    Raises
    ------
    MalariaCellsError
        Bad parameters, a scheduler that cannot be reached, or a screener the workers cannot
        build (one line).
    """
    import dask
    from distributed import Client, LocalCluster

    if client is not None and scheduler is not None:
        raise MalariaCellsError("give client or scheduler, not both")
    if scheduler is not None and (not isinstance(scheduler, str) or not scheduler.strip()):
        raise MalariaCellsError(f"scheduler must be an address such as tcp://host:8786, got {scheduler!r}")
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
        raise MalariaCellsError(f"workers must be a whole number of at least 1, got {workers!r}")
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
        raise MalariaCellsError(f"retries must be a whole number of at least 0, got {retries!r}")
    options = dict(screener_options or {})
    unknown = sorted(set(options) - _SCREENER_PARAMETERS)
    if unknown:
        raise MalariaCellsError(f"screener_options: unknown option(s) {', '.join(unknown)} (Screener takes "
                                f"{', '.join(sorted(_SCREENER_PARAMETERS))})")
    for name, value in (("on_sample", on_sample), ("progress", progress)):
        if value is not None and not callable(value):
            raise MalariaCellsError(f"{name} must be callable, got {type(value).__name__}")
    if gallery is not None and not isinstance(gallery, Gallery):
        raise MalariaCellsError(f"gallery must be a malaria_cells.fields.Gallery, got {type(gallery).__name__}")
    if report is not None:
        if not isinstance(report, ReportWriter) or report.out is None:
            raise MalariaCellsError("report must be a malaria_cells.fields.ReportWriter writing a folder")
        if gallery is not None and gallery is not report.gallery:
            raise MalariaCellsError("give gallery or report (whose gallery is filled), not two galleries")
        gallery = report.gallery
    if isinstance(truth, (str, os.PathLike)) and not os.path.exists(truth):
        raise MalariaCellsError(f"truth: {truth}: no such file or folder")
    samples, skipped = _samples(paths_or_samples)

    owned = []
    plugin = f"malaria-cells-screener-{uuid.uuid4().hex}"
    try:
        if client is None:
            if scheduler is not None:
                try:
                    client = Client(scheduler, timeout="20s")
                except (OSError, TimeoutError) as error:
                    raise MalariaCellsError(f"scheduler {scheduler}: cannot connect ({_one_line(error)})") from None
                owned.append(client)
            else:
                # with many samples, one at a time per worker (the rest wait at the scheduler): a
                # worker that dies then counts against the sample it was screening alone
                with dask.config.set({"distributed.scheduler.allowed-failures": retries,
                                      "distributed.scheduler.worker-saturation": 1.0}):
                    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                           dashboard_address=":0", silence_logs=logging.ERROR)
                owned.append(cluster)
                client = Client(cluster)
                owned.insert(0, client)
        client.register_plugin(ScreenerPlugin(options), name=plugin)
        result = _gather(client, plugin, samples, skipped, truth, gallery, report, on_sample, progress, retries)
    finally:
        if client is not None and not any(isinstance(thing, LocalCluster) for thing in owned):
            # a running cluster outlives this screen: its workers drop their screeners
            with contextlib.suppress(Exception):  # one left there is harmless
                client.unregister_worker_plugin(plugin)
        for thing in owned:
            thing.close()
    return result


def _samples(paths_or_samples) -> tuple[list[tuple[str, list]], list[tuple[str, str]]]:
    """The samples (their names made unique as the single-process loop makes them) and the
    inputs already refused."""
    if isinstance(paths_or_samples, (str, os.PathLike)):
        paths_or_samples = [paths_or_samples]
    try:
        items = list(paths_or_samples)
    except TypeError:
        raise MalariaCellsError(f"paths_or_samples must be paths or (name, fields) samples, got "
                                f"{type(paths_or_samples).__name__}") from None
    if all(isinstance(item, (str, os.PathLike)) for item in items):
        groups, skipped = group_samples(items)
    elif all(isinstance(item, tuple) and len(item) == 2 for item in items):
        groups, skipped = [(name, list(fields)) for name, fields in items], []
    else:
        raise MalariaCellsError("paths_or_samples: give paths, or (name, fields) samples, not a mixture")
    samples, names = [], set()
    for name, fields in groups:
        base, name, k = str(name), str(name), 2
        while name in names:  # two folders of one name are still two samples
            name, k = f"{base} ({k})", k + 1
        names.add(name)
        samples.append((name, fields))
    return samples, list(skipped)


def _gather(client, plugin, samples, skipped, truth, gallery, report, on_sample, progress, retries) -> ScreenResult:
    """Submit one task per sample, take each back as it finishes, and put the screen together."""
    from distributed import as_completed

    token = uuid.uuid4().hex[:12]
    futures = [client.submit(_screen_sample, plugin, name, fields, truth, gallery is not None, report is not None,
                             key=f"malaria-cells-sample-{k}-{token}", retries=retries)
               for k, (name, fields) in enumerate(samples)]
    where = {future.key: k for k, future in enumerate(futures)}
    parts: list[ScreenResult | None] = [None] * len(samples)
    failed: dict[int, str] = {}
    try:
        for future in as_completed(futures, loop=client.loop):  # not the default client's loop
            k = where[future.key]
            if future.status == "finished":
                part, kept, pictures = future.result()
                parts[k] = part
                if gallery is not None and kept is not None:
                    gallery.update(kept)
                if report is not None:  # written as each sample arrives, then dropped
                    for item in part.fields:
                        if item.path in pictures:
                            report.add_pictures(item, pictures.pop(item.path))
            else:
                error = future.exception()
                if isinstance(error, ScreenerUnavailable):
                    raise MalariaCellsError(f"the workers could not build the screener: {error}")
                failed[k] = f"sample not screened, after {retries} retries ({_one_line(error)})"
            future.release()
            if progress is not None:
                progress(len(samples[k][1]))
            if on_sample is not None and parts[k] is not None:
                on_sample(parts[k])
    finally:
        for future in futures:
            future.cancel()
    fields, pooled, models = [], [], []
    for k, (name, _) in enumerate(samples):
        if k in failed:
            skipped.append((name, failed[k]))
            continue
        part = parts[k]
        fields += part.fields
        pooled += part.samples
        skipped += part.skipped
        models.append(part.model)
    if len(pooled) == 1 and models:
        summary = pooled[0]
    else:
        summary, model = client.submit(_pool, plugin, "all", fields, key=f"malaria-cells-pool-{token}",
                                       retries=retries).result()
        models.append(model)
    # a worker whose stage model failed says so, as the single process's description would
    model = next((m for m in models if (m.get("stage_model") or {}).get("error")), models[0])
    return ScreenResult(fields, pooled, summary, skipped, model)


def _worker_screener(plugin: str) -> Screener:
    from distributed import get_worker

    installed = get_worker().plugins[plugin]
    if installed.error is not None:
        raise ScreenerUnavailable(installed.error)
    return installed.screener


def _screen_sample(plugin: str, name: str, fields: list, truth, keep_gallery: bool, draw: bool = False):
    """On a worker: one sample through the one loop; its result and, if asked, its gallery and
    its fields' overlays (``{path: (overlay, thumbnail)}`` JPEG bytes)."""
    from ..images import read_file

    screener = _worker_screener(plugin)
    indexes: dict = {}

    def truth_for(path):
        if not truth:
            return None
        from .truth import read_truth

        return read_truth(path, None if truth is True else truth, indexes)

    items = [(str(item), (lambda p=item: read_file(p, max_pixels=screener.max_pixels)),
              (lambda p=item: truth_for(p))) if isinstance(item, (str, os.PathLike)) else tuple(item)
             for item in fields]
    gallery = Gallery() if keep_gallery else None
    pictures: dict[str, tuple[bytes, bytes]] = {}

    def on_field(result, crops, image):
        if gallery is not None:
            gallery.add(result, crops, image)
        if draw:
            pictures[result.path] = field_pictures(image, result)

    part = screener.screen_samples([(name, items)], on_field=on_field if keep_gallery or draw else None,
                                   summary_name=name)
    return part, gallery, pictures


def _pool(plugin: str, name: str, fields: list):
    """On a worker: the summary of all fields, with the worker screener's description."""
    screener = _worker_screener(plugin)
    return screener.pool(name, fields), screener.describe()


def _one_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else 'no detail'}"
