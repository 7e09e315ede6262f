"""A local web page and REST API over a trained model (FastAPI on uvicorn).

    malaria-cells serve --model runs/first/model.keras        # http://127.0.0.1:8000/

Endpoints: ``GET /`` (drop-images web page), ``POST /v1/predict`` and ``POST /v1/screen``
(multipart ``files``), ``GET /v1/model``, ``GET /healthz``, ``GET /readyz``, OpenAPI docs at
``/docs``; with a records database, ``GET /v1/records``, ``GET /v1/records/{id}`` and
``POST /v1/records/{id}/review`` (a microscopist's sign-off, under a per-user key).

Screening is bounded per process: at most ``screening_slots`` requests screen at once (the
rest wait, up to their time limit), each field within ``max_field_seconds`` and each request
within ``max_seconds``; fields past a limit are reported as not screened and the rest are
answered. Health and readiness are answered on the event loop by a middleware in front of
everything else, so no amount of screening delays them.
"""

import base64
import hmac
import json
import logging
import os
import sys
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from .config import CLASS_NAMES, MAX_IMAGE_PIXELS
from .errors import MalariaCellsError

API_KEY_ENV = "MALARIA_CELLS_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
"""Addresses only this computer can reach: served without an API key."""
MIN_SCREEN_SECONDS = 1.0
"""A screening request whose slot comes with less time than this left is told the server is busy."""


@dataclass
class ServeLimits:
    """What one request may carry and cost.

    Parameters
    ----------
    max_images, max_request_bytes, max_image_pixels : int
        Images and bytes per request, pixels per image.
    max_seconds : float
        Time limit of one screening request, from its arrival (waiting for a slot included).
    max_field_seconds : float
        Time limit of one field.
    screening_slots : int
        Screening requests run at once per process; each field may take a few hundred MB
        while it is screened, so this bounds the process's memory.
    """

    max_images: int = 256
    max_request_bytes: int = 64 * 2**20
    max_image_pixels: int = MAX_IMAGE_PIXELS
    max_seconds: float = 120.0
    max_field_seconds: float = 30.0
    screening_slots: int = 2

    def __post_init__(self):
        for name in ("max_images", "max_request_bytes", "max_image_pixels", "screening_slots"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MalariaCellsError(f"serve limit {name} must be a whole number of at least 1, got {value!r}")
        for name in ("max_seconds", "max_field_seconds"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise MalariaCellsError(f"serve limit {name} must be a number of seconds above 0, got {value!r}")


class _Load:
    """Screening requests running and waiting in this process (what /readyz reports).

    Requests wait for a slot on the event loop, not in the thread pool, so a queue of them
    never holds the threads the other endpoints run in. Used on the event loop only.
    """

    def __init__(self, slots: int):
        self.slots, self.active, self.waiting = slots, 0, 0
        self._free = None  # an asyncio.Semaphore, made on the event loop at first use

    async def enter(self, timeout: float) -> bool:
        import asyncio

        if self._free is None:
            self._free = asyncio.Semaphore(self.slots)
        self.waiting += 1
        try:
            await asyncio.wait_for(self._free.acquire(), max(0.0, timeout))
        except asyncio.TimeoutError:
            return False
        finally:
            self.waiting -= 1
        self.active += 1
        return True

    def leave(self) -> None:
        self.active -= 1
        self._free.release()


class HealthEndpoints:
    """ASGI middleware answering ``GET /healthz`` (alive) and ``GET /readyz`` (ready for more
    screening: 503 while as many requests wait as there are slots) on the event loop, before
    any other middleware or the thread pool that runs the endpoints."""

    def __init__(self, app, load: _Load):
        self.app, self.load = app, load

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] in ("/healthz", "/readyz"):
            if scope["path"] == "/healthz":
                body, status = {"status": "ok"}, 200
            else:
                load = self.load
                busy = load.waiting >= load.slots
                body = {"status": "busy" if busy else "ready", "screening": load.active, "waiting": load.waiting,
                        "slots": load.slots}
                status = 503 if busy else 200
            return await JSONResponse(body, status_code=status)(scope, receive, send)
        return await self.app(scope, receive, send)


ACCESS_LOG = logging.getLogger("malaria_cells.access")
"""One JSON line per request (``serve`` writes them to stderr): time, method, path, status,
milliseconds, bytes sent, client address. Never the query string, headers, file names or
bodies, which may hold patient identifiers."""


class AccessLog:
    """ASGI middleware writing :data:`ACCESS_LOG`'s line for every HTTP request, when it ends
    (health and readiness checks only when they fail: an orchestrator polls them every few
    seconds)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        import time

        started, sent = time.perf_counter(), {"status": 500, "bytes": 0}

        async def counting(message):
            if message["type"] == "http.response.start":
                sent["status"] = message["status"]
            elif message["type"] == "http.response.body":
                sent["bytes"] += len(message.get("body", b""))
            await send(message)

        try:
            await self.app(scope, receive, counting)
        finally:
            if not (scope.get("path") in ("/healthz", "/readyz") and sent["status"] == 200):
                _log_request(scope, sent["status"], sent["bytes"], time.perf_counter() - started)


def _log_request(scope, status: int, size: int, seconds: float) -> None:
    import datetime

    ACCESS_LOG.info(json.dumps({
        "time": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds"),
        "method": scope.get("method", ""), "path": scope.get("path", "")[:200], "status": status,
        "ms": round(1000 * seconds, 1), "bytes": size, "client": (scope.get("client") or ("", 0))[0]}))


def _log_access_to_stderr() -> None:
    """Send the access log's lines to stderr, one JSON object a line (a served process's)."""
    if not ACCESS_LOG.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        ACCESS_LOG.addHandler(handler)
        ACCESS_LOG.setLevel(logging.INFO)
        ACCESS_LOG.propagate = False


def _give_back_memory() -> None:
    """Return freed heap memory to the system (glibc keeps it for reuse otherwise, so a server
    that once screened large fields would stay at its peak size); nothing elsewhere."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class UploadError(ValueError):
    """An uploaded file that cannot be scored, with the HTTP status that says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class RequestSizeLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes``.

    A declared Content-Length is refused before anything is read; a body sent in chunks
    without one is counted as it arrives and refused once it passes the limit. (A plain ASGI
    class rather than ``@app.middleware``, whose wrapping of every request in extra tasks and
    streams cost CPU time on the event loop.)
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            response = JSONResponse({"detail": self._message(int(length))}, status_code=413)
            return await response(scope, receive, send)
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_bytes:  # FastAPI answers an HTTPException raised while it reads the body
                raise HTTPException(413, self._message(received, "at least "))
            return message

        await self.app(scope, counted_receive, send)

    def _message(self, size: int, qualifier: str = "") -> str:
        return f"request too large ({qualifier}{size} bytes, limit {self.max_bytes})"


class ApiKeyRequired:
    """ASGI middleware: every path but those in ``open_paths`` needs a key.

    A middleware rather than a dependency on each route, so a route added later (and the
    documentation pages FastAPI adds itself) cannot slip through. The key comes as header
    ``X-API-Key`` or, for pages opened in a browser, query parameter ``api_key``: the shared
    ``api_key``, or one of the ``user_keys`` (``{name: key}``), whose name the request then
    carries as ``request.state.user`` (the reviewer a review is recorded under). Every key is
    compared, each in constant time, so the time taken says nothing of which key came close.
    """

    def __init__(self, app, api_key: str | None = None, open_paths: frozenset = frozenset({"/healthz"}),
                 user_keys: dict[str, str] | None = None):
        self.app, self.open_paths = app, open_paths
        self.keys = ([(None, api_key.encode())] if api_key else []) + \
            [(name, key.encode()) for name, key in (user_keys or {}).items()]

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            return await self.app(scope, receive, send)
        from urllib.parse import parse_qs

        given = dict(scope["headers"]).get(b"x-api-key", b"")
        if not given:
            given = parse_qs(scope.get("query_string", b"").decode(errors="replace")).get("api_key", [""])[0].encode()
        matched, user = False, None
        for name, key in self.keys:  # no early exit: every key is compared
            if hmac.compare_digest(given, key):
                matched, user = True, name
        if not matched:
            response = JSONResponse({"detail": "missing or wrong API key (send header X-API-Key)"}, status_code=401)
            return await response(scope, receive, send)
        scope.setdefault("state", {})["user"] = user
        return await self.app(scope, receive, send)


MIN_USER_KEY = 12
"""Fewest characters of a per-user key."""


def read_user_keys(path: str | os.PathLike) -> dict[str, str]:
    """Per-user keys from a CSV file of ``name,key`` rows (a ``name,key`` header is skipped,
    blank lines too): ``{name: key}``.

    Raises
    ------
    MalariaCellsError
        A missing file, a row that is not two values, an empty or repeated name, a key shorter
        than :data:`MIN_USER_KEY` characters or given twice, or a file with no key.
    """
    import csv

    try:
        with open(path, encoding="utf-8", newline="") as stream:
            rows = list(csv.reader(stream))
    except (OSError, UnicodeDecodeError) as error:
        raise MalariaCellsError(f"user keys {path}: cannot read ({getattr(error, 'strerror', None) or error})") from None
    keys: dict[str, str] = {}
    for number, row in enumerate(rows, 1):
        if not any(value.strip() for value in row) or (number == 1 and [v.strip().lower() for v in row] == ["name", "key"]):
            continue
        _check_user_key(path, number, row, keys)
        keys[row[0].strip()] = row[1].strip()
    if not keys:
        raise MalariaCellsError(f"user keys {path}: no keys (one line per reviewer: name,key)")
    return keys


def _check_user_key(path, number: int, row: list[str], keys: dict[str, str]) -> None:
    where = f"user keys {path}, line {number}"
    if len(row) != 2:
        raise MalariaCellsError(f"{where}: expected name,key, got {len(row)} value{'s' if len(row) != 1 else ''}")
    name, key = row[0].strip(), row[1].strip()
    if not name or not name.isprintable() or len(name) > 200:
        raise MalariaCellsError(f"{where}: a reviewer's name is one line of 1 to 200 characters")
    if name in keys:
        raise MalariaCellsError(f"{where}: {name!r} is named twice")
    if len(key) < MIN_USER_KEY or not key.isprintable():
        raise MalariaCellsError(f"{where}: {name!r}'s key is shorter than {MIN_USER_KEY} characters")
    if key in keys.values():
        raise MalariaCellsError(f"{where}: {name!r}'s key is another reviewer's too; give each their own")


def check_upload(contents: bytes, max_pixels: int) -> None:
    """Refuse empty, non-image and oversized uploads from their header, before decoding."""
    from .images import NOT_AN_IMAGE, UnreadableImage, dimensions

    if not contents:
        raise UploadError(422, "empty file")
    try:
        width, height = dimensions(contents)
    except UnreadableImage as error:
        status = 415 if str(error) == NOT_AN_IMAGE else 413 if "too large" in str(error) else 422
        raise UploadError(status, str(error)) from None
    if width * height > max_pixels:
        raise UploadError(413, f"image too large ({width}x{height} pixels, limit {max_pixels})")


def _checked_user_keys(user_keys, db, api_key: str | None) -> dict[str, str] | None:
    if user_keys is None:
        return None
    if db is None:
        raise MalariaCellsError("user keys: reviews are of recorded samples; name the records database (db=URL)")
    if not isinstance(user_keys, dict):
        user_keys = read_user_keys(user_keys)
    if api_key is not None and api_key in user_keys.values():
        raise MalariaCellsError("a per-user key is also the shared API key; give each reviewer a key of their own")
    return user_keys


def create_app(model=None, *, api_key: str | None = None, limits: ServeLimits | None = None, db: str | None = None,
               user_keys: str | os.PathLike | dict | None = None):
    """Build the FastAPI application.

    Parameters
    ----------
    model : path or CellClassifier, optional
        Defaults to the model shipped with the package.
    api_key : str, optional
        When set (or ``$MALARIA_CELLS_API_KEY``), every endpoint but ``/healthz``
        requires it, as header ``X-API-Key`` (or ``?api_key=`` for the web page).
    limits : ServeLimits, optional
        Maximum images and bytes per request, and pixels per image.
    db : str, optional
        A records database URL (:func:`malaria_cells.records.open_records`): each
        ``/v1/screen`` sample is recorded there, in the worker thread that screened it, and the
        answer carries its ``record_id`` (header ``X-Record-Id`` for the other formats), its
        cells for review are kept, and the records can be listed and reviewed:
        ``GET /v1/records``, ``GET /v1/records/{id}``, ``POST /v1/records/{id}/review``.
    user_keys : path or dict, optional
        Per-user keys: a CSV file of ``name,key`` rows (:func:`read_user_keys`) or ``{name: key}``.
        Each is accepted wherever the API key is, and names the reviewer of a review; a review
        sent with another key (or none) is refused with 403.
    """
    from . import __version__
    from .pipeline import preprocess_many
    from .inference import label_for
    from .runtimes import default_model_path, load_model

    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    user_keys = _checked_user_keys(user_keys, db, api_key)  # before any model is loaded

    # Without a named model, cells are scored by the shipped cell model and fields by the
    # shipped field model; a named model does both.
    from .fields import Screener

    field_model = load_model(default_model_path(fields=True)) if model is None else None
    model = load_model(model)
    limits = limits or ServeLimits()
    crop_check = "shape" if model.info.get("color") == "gray" else True
    screener = Screener(field_model or model, max_pixels=limits.max_image_pixels,
                        max_field_seconds=limits.max_field_seconds)
    load = _Load(limits.screening_slots)
    records = None
    if db is not None:
        from .records import open_records

        records = open_records(db)  # a bad URL or an unreachable server: the server does not start
    model_version = model.info.get("trained_at") or os.path.basename(model.path)
    app = FastAPI(title="malaria-cells", version=__version__, docs_url=None, redoc_url=None,
                  description="Label red blood cells as Parasitized or Uninfected, and screen smear photographs.")

    @app.get("/docs", include_in_schema=False)
    def docs(request: Request):
        from urllib.parse import quote

        from fastapi.openapi.docs import get_swagger_ui_html

        # The page fetches the schema itself: it passes on the key it was opened with.
        key = request.query_params.get("api_key")
        schema = app.openapi_url + (f"?api_key={quote(key)}" if key else "")
        return get_swagger_ui_html(openapi_url=schema, title="malaria-cells API")

    # Middlewares run last-added first: the key is checked before the body is read.
    app.add_middleware(RequestSizeLimit, max_bytes=limits.max_request_bytes)
    if api_key is not None or user_keys:
        app.add_middleware(ApiKeyRequired, api_key=api_key, user_keys=user_keys)
    app.add_middleware(HealthEndpoints, load=load)
    app.add_middleware(AccessLog)  # outermost: every request is logged, health checks too

    # Documented here; answered by HealthEndpoints before these routes are reached.
    @app.get("/healthz", summary="Liveness check (no API key needed)")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 503 while the screening slots are all taken and as many wait (no key)")
    async def readyz():
        return {"status": "ready"}

    @app.get("/v1/model", summary="The models in use: cells (/v1/predict) and fields (/v1/screen)")
    def model_info():
        # file names only: where the server keeps its files is none of a client's business
        fields_model = screener.classifier
        return {"path": os.path.basename(model.path), "version": model_version, "image_size": model.image_size,
                "threshold": model.threshold, "class_names": list(CLASS_NAMES),
                "limits": limits.__dict__, "info": model.info,
                "fields": {"path": os.path.basename(fields_model.path), "counting_threshold": screener.threshold,
                           "version": fields_model.info.get("trained_at"),
                           "figures": screener.figures.to_info() if screener.figures else None,
                           "stage_model": screener.describe()["stage_model"]}}

    @app.post("/v1/predict", summary="Label uploaded cell images")
    def predict(files: list[UploadFile] = File(..., description="cell images")):
        if len(files) > limits.max_images:
            raise HTTPException(413, f"too many images ({len(files)}, limit {limits.max_images})")
        results, accepted, contents = [], [], []
        for upload in files:
            data = upload.file.read()
            entry = {"filename": upload.filename}
            try:
                check_upload(data, limits.max_image_pixels)
                accepted.append(entry)
                contents.append(data)
            except UploadError as error:
                entry.update(status=error.status, error=str(error))
            results.append(entry)
        images, decoded, reasons = preprocess_many(contents, model.image_size, check_crop=crop_check)
        for entry, ok, reason in zip(accepted, decoded, reasons):
            if not ok:
                entry.update(status=422, error=reason)
        scored = [e for e, ok in zip(accepted, decoded) if ok]
        probabilities = model.probability(images) if len(images) else []
        for entry, probability in zip(scored, probabilities):
            entry.update(status=200, probability=round(float(probability), 6),
                         label=label_for(probability, model.threshold))
        n_parasitized = sum(1 for e in scored if e["label"] == CLASS_NAMES[1])
        body = {"model_version": model_version, "threshold": model.threshold, "results": results,
                "summary": {"n": len(scored), "n_parasitized": n_parasitized, "n_rejected": len(results) - len(scored),
                            "percent_parasitized": round(100 * n_parasitized / len(scored), 2) if scored else None}}
        status = 200 if scored else max(e["status"] for e in results)
        return JSONResponse(body, status_code=status)

    @app.post("/v1/screen", summary="Screen uploaded smear photographs (one sample)")
    async def screen_fields(files: list[UploadFile] = File(..., description="field photographs of one sample"),
                            overlays: bool = False, format: str = "json", report: bool = False,
                            patient: str = "", slide: str = "", operator: str = "", date: str = "", site: str = "",
                            note: str = ""):
        """Counts, parasitemia and the call, as ``malaria-cells screen`` gives them: ``format``
        ``json`` (default; with ``?overlays=true`` each field also carries its overlay as a
        JPEG data URL, and with ``?report=true`` the answer carries ``report``: the sample's
        report as self-contained ``html``, ``pdf`` (base64) and its ``gallery`` of cells with heat
        maps), ``table``, ``csv``, or the report alone as ``html`` or ``pdf``. ``patient``,
        ``slide``, ``operator``, ``date`` (YYYY-MM-DD), ``site`` and ``note`` label the sample.
        Fields are decoded one at a time, within the process's budget of decoded pixels, at
        most ``screening_slots`` requests at once; fields past the time limits are listed as
        not screened."""
        import time

        from .fields import FORMATS
        from .fields.metadata import SampleMetadata, attach_metadata
        from .fields import Gallery
        from .fields.report import ReportWriter, draw_overlay, overlay_data_url

        arrived = time.perf_counter()

        if format not in (*FORMATS, "html", "pdf"):
            raise HTTPException(422, f"unknown format {format!r} (choose from {', '.join(FORMATS)}, html, pdf)")
        try:
            metadata = SampleMetadata(patient=patient, slide=slide, operator=operator, date=date, site=site, note=note)
        except MalariaCellsError as error:
            raise HTTPException(422, str(error)) from None
        writer = ReportWriter(None, pdf=format == "pdf" or (report and format == "json"),
                              **screener.report_options()) if (report and format == "json") or format in ("html", "pdf") else None
        # the cells a reviewer will see: the report's gallery, or one kept for the records alone
        gallery = writer.gallery if writer is not None else Gallery() if records is not None else None
        if len(files) > limits.max_images:
            raise HTTPException(413, f"too many images ({len(files)}, limit {limits.max_images})")
        pictures = {}

        seen: dict[str, int] = {}

        def field_of(index, upload):
            name = upload.filename or f"field-{index + 1}"
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:  # phones name every photograph alike: each keeps its own overlay
                name = f"{name} ({seen[name]})"

            def read():
                data = upload.file.read()
                try:
                    check_upload(data, limits.max_image_pixels)
                except UploadError as error:
                    raise MalariaCellsError(str(error)) from None
                return data

            return name, read

        def on_field(result, crops, image):
            if overlays:
                pictures[result.path] = overlay_data_url(draw_overlay(image, result, side=1600))
            if writer is not None:
                writer.add(result, crops, image)
            elif gallery is not None:
                gallery.add(result, crops, image)

        from starlette.concurrency import run_in_threadpool

        def screen_now(remaining):
            try:
                result = screener.screen_samples([("upload", [field_of(k, u) for k, u in enumerate(files)])],
                                                 on_field=on_field, max_seconds=remaining)
                attach_metadata(result, defaults=metadata)
                built = (writer.build(result, deadline=arrived + limits.max_seconds)
                         if writer is not None and result.fields else None)
                ids, not_recorded = [], None
                if records is not None and result.fields:
                    try:
                        ids = records.add(result, source="server", gallery=gallery)
                    except MalariaCellsError as error:
                        not_recorded = str(error)
                return result, built, ids, not_recorded
            finally:
                _give_back_memory()

        busy = f"server busy: no screening slot within {limits.max_seconds:g} s; try again later"
        if not await load.enter(limits.max_seconds):
            raise HTTPException(503, busy)
        try:
            remaining = limits.max_seconds - (time.perf_counter() - arrived)
            if remaining < MIN_SCREEN_SECONDS:  # a slot came too late to screen anything in time
                raise HTTPException(503, busy)
            result, built, ids, not_recorded = await run_in_threadpool(screen_now, remaining)
        finally:
            load.leave()
        if not_recorded is not None:  # screened, but no result goes out unrecorded
            raise HTTPException(503, f"not recorded: {not_recorded}")
        recorded = {"X-Record-Id": str(ids[0])} if ids else {}
        if not result.fields:
            timed_out = result.skipped and all(r.startswith("not screened:") for _, r in result.skipped)
            raise HTTPException(503 if timed_out else 422,
                                "no field could be screened: " + "; ".join(f"{p}: {r}" for p, r in result.skipped))
        if format == "html":
            return HTMLResponse(built["html"], headers=recorded)
        if format == "pdf":
            if built["pdf"] is None:
                raise HTTPException(501, "; ".join(writer.warnings) or "no PDF")
            return Response(built["pdf"], media_type="application/pdf",
                            headers={"Content-Disposition": 'attachment; filename="report.pdf"', **recorded})
        if format != "json":
            from .fields import render

            return Response(render(result, format), media_type=FORMATS[format].media_type, headers=recorded)
        body = result.to_dict()
        if records is not None:
            body["record_id"] = ids[0]
        for entry in body["fields"]:
            entry["overlay"] = pictures.get(entry["path"])
        if built is not None:
            body["report"] = {"html": built["html"], "gallery": built["gallery"],
                              "pdf": base64.b64encode(built["pdf"]).decode() if built["pdf"] else None,
                              "warnings": writer.warnings}
        return JSONResponse(json.loads(json.dumps(body, default=float)))

    if records is not None:
        add_review_routes(app, records, reviewers=bool(user_keys))

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page():
        return resources.files("malaria_cells").joinpath("static/index.html").read_text(encoding="utf-8")

    return app


class ReviewBody(BaseModel):
    """A sign-off: verdicts on the cells shown for review, a comment, and optionally the call."""

    verdicts: dict[str, str] = Field(default_factory=dict,
                                     description='{"cell id": "confirm" | "reject"} for cells of GET /v1/records/{id}')
    comment: str | None = Field(None, description="a free comment")
    call: str | None = Field(None, description="the reviewer's own call (positive, negative, review); "
                             "without it, the call follows from the verdicts")


RECORDS_LIMIT = 200
"""Most samples ``GET /v1/records`` lists at once."""


def add_review_routes(app: FastAPI, records, *, reviewers: bool) -> None:
    """``GET /v1/records``, ``GET /v1/records/{id}`` and ``POST /v1/records/{id}/review``: thin
    layers over :class:`malaria_cells.records.Records`; a review needs a per-user key (its name
    is the reviewer), which ``reviewers`` says the server has."""
    from .records import UnknownRecord

    def found(run):
        try:
            return run()
        except UnknownRecord as error:
            raise HTTPException(404, str(error)) from None
        except MalariaCellsError as error:
            raise HTTPException(422, str(error)) from None

    @app.get("/v1/records", summary="Recorded samples, newest first, with the automatic and the reviewed call")
    def list_records(limit: int = 50, since: str | None = None, call: str | None = None):
        if not 1 <= limit <= RECORDS_LIMIT:
            raise HTTPException(422, f"limit must be 1 to {RECORDS_LIMIT}, got {limit}")
        samples = found(lambda: records.samples(since=since, call=call, limit=limit))
        return {"samples": [item.to_dict() for item in samples]}

    @app.get("/v1/records/{sample_id}", summary="A recorded sample, its cells for review (PNG data URLs), its reviews")
    def get_record(sample_id: int, request: Request):
        sample = found(lambda: records.sample(sample_id, fields=False))
        return {"sample": sample.to_dict(), "cells": [cell.to_dict(image=True) for cell in
                                                      records.cells_for_review(sample_id)],
                "reviews": [review.to_dict() for review in records.reviews(sample_id)],
                "reviewer": getattr(request.state, "user", None)}

    @app.post("/v1/records/{sample_id}/review", status_code=201,
              summary="Sign off a recorded sample (needs a per-user key: its name is the reviewer)")
    def review_record(sample_id: int, body: ReviewBody, request: Request):
        reviewer = getattr(request.state, "user", None)
        if reviewer is None:
            raise HTTPException(403, "a review needs a reviewer's own key (X-API-Key from serve --user-keys)"
                                if reviewers else "this server takes no reviews: start it with --user-keys FILE "
                                "(name,key per reviewer)")
        found(lambda: records.sample(sample_id, fields=False))
        review_id = found(lambda: records.review(sample_id, body.verdicts, reviewer=reviewer, comment=body.comment,
                                                 call=body.call))
        sample = records.sample(sample_id, fields=False)
        return {"review_id": review_id, "sample": sample.to_dict(),
                "reviews": [review.to_dict() for review in records.reviews(sample_id)]}


def serve(model=None, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: ServeLimits | None = None, workers: int = 1, no_auth: bool = False, db: str | None = None,
          user_keys: str | os.PathLike | None = None) -> None:
    """Run the web page and API with uvicorn until interrupted.

    With ``workers`` > 1, that many processes share the port (uvicorn's workers), each
    with its own copy of the model: requests are then parsed and answered in parallel
    instead of sharing one Python interpreter.

    On an address other than loopback, an API key is required (``api_key`` or
    ``$MALARIA_CELLS_API_KEY``): patients' images would otherwise be open to anyone on the
    network. ``no_auth=True`` serves without one anyway, with a warning (a network that is
    already closed, or a proxy that checks its own keys).

    With ``db`` (a records database URL), each ``/v1/screen`` sample is recorded there; with
    ``user_keys`` (a CSV file of ``name,key`` rows), recorded samples can be reviewed, each
    review under the name of the key it came with.
    """
    import uvicorn

    if not 0 < port < 65536:
        raise MalariaCellsError(f"port must be 1 to 65535, got {port}")
    if workers < 1:
        raise MalariaCellsError(f"workers must be at least 1, got {workers}")
    message = (f"Serving on http://{host}:{port}/ (API docs at /docs) with {workers} worker"
               f"{'s' if workers > 1 else ''}; Ctrl-C to stop")
    if user_keys is not None:
        if db is None:
            raise MalariaCellsError("--user-keys: reviews are of recorded samples; name the records database "
                                    "(--db URL or $MALARIA_CELLS_DB)")
        read_user_keys(user_keys)  # fail at once, with one line, on a bad file
    if host not in LOOPBACK and not (api_key or os.environ.get(API_KEY_ENV) or user_keys):
        if not no_auth:
            raise MalariaCellsError(
                f"--host {host}: other computers could reach this server, and no API key is set; set one "
                f"(--api-key KEY or ${API_KEY_ENV}), or pass --no-auth to serve without one")
        message += (f"\nwarning: listening on {host} without an API key (--no-auth): anyone who can reach this "
                    "computer can use it")
    _log_access_to_stderr()
    if workers == 1:
        app = create_app(model, api_key=api_key, limits=limits, db=db, user_keys=user_keys)
        print(message, file=sys.stderr, flush=True)
        uvicorn.run(app, host=host, port=port, log_level="warning")
        return
    from .runtimes import load_model

    # Loaded here only to fail once, with one line, on a bad model; the workers build their own
    # app from this description (uvicorn needs an import string), this process only supervises.
    model_path = load_model(model).path
    if db is not None:
        from .records import open_records

        open_records(db).close()  # fail once, with one line, on a bad URL (and migrate before the workers start)
    os.environ[_WORKER_CONFIG_ENV] = json.dumps({"model": None if model is None else model_path, "api_key": api_key,
                                                 "limits": (limits or ServeLimits()).__dict__, "db": db,
                                                 "user_keys": None if user_keys is None else os.fspath(user_keys)})
    print(message, file=sys.stderr, flush=True)
    uvicorn.run(f"{__name__}:app_from_environment", factory=True, host=host, port=port,
                log_level="warning", workers=workers)


_WORKER_CONFIG_ENV = "MALARIA_CELLS_SERVE_CONFIG"


def app_from_environment():
    """The app a ``serve(workers=N)`` worker process runs (its settings come in the environment)."""
    _log_access_to_stderr()
    config = json.loads(os.environ[_WORKER_CONFIG_ENV])
    return create_app(config["model"], api_key=config["api_key"], limits=ServeLimits(**config["limits"]),
                      db=config.get("db"), user_keys=config.get("user_keys"))
