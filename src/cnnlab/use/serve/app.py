"""The web demo: a page to draw or upload a picture, and a JSON API, for one or more trained runs.

    POST /api/predict   the picture as the body (Content-Type image/png, image/jpeg, ...; ?model= picks the
                        model), or a multipart form with it in field `file` (+ optional `model`): the JSON of
                        `cnnlab predict --json`; ?details=true adds the prepared input (28x28 grey, 32x32
                        colour, ...) and each conv layer's feature maps (PNG data URLs)
    GET  /api/model     the models served: dataset, classes, parameters, test accuracy

Concurrent requests for one model share a forward pass (`batching.Batcher`): up to `max_batch` images, gathered
for at most `max_wait_ms`; a full queue answers 503 with Retry-After, a request that waits past `timeout_s` 504.

Safe by default: uploads over `max_upload_bytes` get 413 before they are read, images over `max_pixels`
are refused from their header (decompression bombs), formats outside ACCEPTED_FORMATS get 415 (judged by
Pillow from the bytes, not by the name or the client's content type), bad input gets a 4xx with a one-line
message, and an unexpected failure a 500 without a stack trace.
"""
from __future__ import annotations

import asyncio
import io
import logging
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from PIL import Image
from starlette.datastructures import FormData
from starlette.datastructures import UploadFile as FormFile

from cnnlab.errors import UserError
from cnnlab.images import MAX_PIXELS, ImageReadError, ImageTooLarge, png_data_url
from cnnlab.use.predict import ModelOutputError, Prediction, Predictor
from cnnlab.use.recipes import BlankImage
from cnnlab.use.serve.batching import Batcher, BatchSettings, Forward, QueueFull
from cnnlab.use.serve.guards import (
    BODY_SEEN,
    LOOPBACK_NAMES,
    BodyTooLarge,
    HostCheck,
    UploadLimit,
    add_error_handlers,
)

STATIC = Path(__file__).parent / "static"
MAX_UPLOAD_BYTES = 5 * 1024 * 1024  # a phone photo as JPEG fits; a bigger body is refused unread
MAX_MAPS_SHOWN = 32  # feature maps per layer sent to the page
# Uploads decoded at once: a 5 MB JPEG can hold 48 megapixels and take ~450 MB to prepare, so 16 at once
# could exhaust memory; the CPU cannot prepare more than a couple at a time anyway. Their own two threads, not
# the shared pool's 40: glibc keeps what a thread freed in that thread's arena, so decodes spread over 40 threads
# held ~2 GB after a few hundred uploads (and kept growing), the same decodes on two threads stay under 1 GB.
DECODERS = 2
DECODING = ThreadPoolExecutor(DECODERS, thread_name_prefix="cnnlab-decode")
# Pillow's format names of the pictures people upload (MPO: a phone camera's multi-picture JPEG). Pillow reads
# some 40 formats; strangers' bytes only reach these decoders, so TIFF, PSD, JPEG 2000, ICO... are refused, and
# EPS, whose decoding runs Ghostscript, never gets that far.
ACCEPTED_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "GIF": "GIF", "BMP": "BMP", "WEBP": "WebP"}
ACCEPTED = ", ".join(dict.fromkeys(ACCEPTED_FORMATS.values()))  # "PNG, JPEG, GIF, BMP, WebP" for messages
MAX_FORM_FILES, MAX_FORM_FIELDS = 4, 16  # the page sends one file and one field; a form of thousands is not a client's
FLAGS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}
MAX_NAME_CHARS = 255  # a file name longer than any file system allows is not a browser's
RAW_BODY_NAME = "upload"  # what the answer's "file" says for a picture sent as the body, which has no file name
RETRY_AFTER_SECONDS = 1  # what a 503 for a full queue tells the client: a full queue drains in well under a second
log = logging.getLogger("cnnlab.use.serve")


class ServeError(UserError, ValueError):
    """Runs that cannot be served together (the same run twice, two models of one name)."""


def unique_names(predictors: list[Predictor]) -> list[Predictor]:
    """Give every model a distinct name by construction: its run folder's name, with as many parent folders
    as it takes to tell it from every other run served (`a/mnist` and `b/mnist`, while `mnist-2` stays itself).

    Never a number appended: `mnist-2` can be another run's real name, and one model would answer for the
    other. A Predictor named by its caller keeps that name; the same run twice, or two models left with one
    name, is a ServeError.
    """
    by_path: dict[Path, Predictor] = {}
    for predictor in predictors:
        if predictor.run is None or predictor.name != predictor.run.name:
            continue  # a name its caller chose
        path = predictor.run.resolve()
        if path in by_path:
            raise ServeError(f"{predictor.run} is given twice (also as {by_path[path].run}); serve each run once")
        by_path[path] = predictor
    parts = {path: path.parts[1:] for path in by_path}  # without the root: a name never starts with '/'
    for path, predictor in by_path.items():
        mine = parts[path]
        depth = next((k for k in range(1, len(mine)) if all(other[-k:] != mine[-k:] for p, other in parts.items()
                                                             if p != path)), len(mine))
        predictor.name = "/".join(mine[-depth:])
    names: dict[str, Predictor] = {}
    for predictor in predictors:
        if predictor.name in names:
            raise ServeError(f"two models are named {predictor.name!r}; give each its own name")
        names[predictor.name] = predictor
    return predictors


def create_app(models: Sequence[str | Path | Predictor], max_upload_bytes: int = MAX_UPLOAD_BYTES,
               max_pixels: int = MAX_PIXELS, batching: BatchSettings | None = None,
               allowed_hosts: Sequence[str] = LOOPBACK_NAMES, backend: str = "torch") -> FastAPI:
    """The web app serving these runs (paths or loaded Predictors); the first is the default model.

    It answers only requests whose Host is one of `allowed_hosts` (`guards.served_hosts` for a bound address).
    Runs given as paths run on `backend` (`cnnlab.use.backends`); a loaded Predictor keeps its own.
    """
    if not models:
        raise ValueError("serve needs at least one run")
    settings = batching or BatchSettings()
    loaded = [(m, None) if isinstance(m, Predictor) else with_backend(Predictor.from_run(m), backend) for m in models]
    predictors = unique_names([predictor for predictor, _ in loaded])
    backend_lines = {predictor.name: line for predictor, line in loaded if line is not None}
    by_name = {p.name: p for p in predictors}
    batchers = {p.name: Batcher(forward_of(p), settings, p.name) for p in predictors}  # a queue and worker per model

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        for batcher in batchers.values():  # on shutdown: the workers finish what is queued, then stop
            await asyncio.to_thread(batcher.close)

    app = FastAPI(title="cnnlab", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.batchers = batchers  # for tests and benchmarks: queue lengths and passes run
    app.state.backend_lines = backend_lines  # what runs each model loaded here, and why: `cnnlab serve` prints them
    app.add_middleware(UploadLimit, limit=max_upload_bytes)
    app.add_middleware(HostCheck, allowed=allowed_hosts)  # added last: runs first, before any body is read
    add_error_handlers(app, log)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)  # HEAD: what monitors and curl -I ask
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/api/model")
    def describe_models() -> dict:
        return {"default": predictors[0].name, "models": [p.describe() for p in predictors],
                "max_upload_bytes": max_upload_bytes, "accepted_formats": ACCEPTED.split(", ")}

    @app.post("/api/predict")
    async def predict(request: Request) -> JSONResponse:
        raw = is_raw_picture(request)  # the picture is the body: no form to parse (what scripts and apps send)
        form = None if raw else await read_form(request)
        field = None if form is None else picture_field(form)
        chosen = chosen_model(request, form)
        predictor = choose_model(by_name, chosen, predictors[0])
        details = query_flag(request, "details")
        name = RAW_BODY_NAME if field is None else plain_name(field.filename)
        batcher = batchers[predictor.name]
        if not batcher.has_room():  # refuse before decoding: an overloaded server should not take on more work
            raise busy(batcher)
        # a raw body is read only now, after the cheap checks (at most max_upload_bytes: UploadLimit sees to it)
        upload = await request.body() if field is None else field.file
        # a JSONResponse of our own: FastAPI would validate and re-encode a returned dict field by field first
        return JSONResponse(await answer(predictor, batcher, upload, name, details, max_pixels))

    return app


def is_raw_picture(request: Request) -> bool:
    """Whether the body is the picture itself (Content-Type image/..., e.g. `curl --data-binary @x.png -H
    'Content-Type: image/png'`) rather than a form; the format is judged from the bytes, not from this type."""
    kind = request.headers.get("content-type", "").partition(";")[0].strip().lower()
    return kind.startswith("image/")


def with_backend(predictor: Predictor, backend: str) -> tuple[Predictor, str]:
    """The predictor running on `backend`, and the line saying which backend it got and why."""
    return predictor, predictor.use_backend(backend).line()


async def read_form(request: Request) -> FormData:
    """The request's multipart form; 400 naming what was expected for another body, a malformed one, or one
    cut off before its closing boundary (the parser takes that for a form without the cut part)."""
    from python_multipart.multipart import parse_options_header
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.formparsers import MultiPartException

    kind, options = parse_options_header(request.headers.get("content-type", ""))
    if kind != b"multipart/form-data":
        found = kind.decode("latin-1")[:60] or "no content type"
        raise HTTPException(400, f"expected the picture as the body (Content-Type image/png, image/jpeg, ...) or "
                                 f"a multipart/form-data body with it in field 'file', found {found}")
    boundary = options.get(b"boundary", b"")
    if not boundary:
        raise HTTPException(400, "the multipart/form-data body has no boundary in its Content-Type; send the "
                                 "picture as a form field 'file' (curl -F file=@picture.png)")
    try:
        form = await request.form(max_files=MAX_FORM_FILES, max_fields=MAX_FORM_FIELDS)
    except (MultiPartException, StarletteHTTPException) as exc:  # Starlette raises the parser's error as a 400
        if isinstance(exc, StarletteHTTPException) and (exc.status_code != 400 or isinstance(exc, BodyTooLarge)):
            raise  # the body ran past the limit while it was parsed: 413
        problem = str(getattr(exc, "message", None) or getattr(exc, "detail", "")).rstrip(".")
        raise HTTPException(400, f"the multipart/form-data body is malformed ({problem}); send the picture as a "
                                 "form field 'file'") from None
    seen = request.scope.get(BODY_SEEN)
    if seen is not None and b"--" + boundary + b"--" not in seen.tail:
        await form.close()
        raise HTTPException(400, f"the multipart/form-data body ends after {seen.size:,} bytes without its closing "
                                 "boundary: it was cut off; send the whole request")
    return form


def chosen_model(request: Request, form: FormData | None) -> Any:
    """The model a request names, in the query (?model=) or the form (field 'model'); 400 when they disagree."""
    in_query = request.query_params.get("model")
    in_form = None if form is None else form.get("model")
    if in_query and isinstance(in_form, str) and in_form and in_form != in_query:
        raise HTTPException(400, f"two models named: {in_query!r} in the query, {in_form!r} in the form; name one")
    return in_query or in_form  # choose_model refuses a file in the field


def picture_field(form: FormData) -> FormFile:
    """The uploaded file of field 'file'; 400 saying what was expected when it is missing or text."""
    uploads = form.getlist("file")
    if len(uploads) > 1:  # one answer per request: the others would be dropped without a word
        raise HTTPException(400, f"{len(uploads)} 'file' fields: send one picture per request")
    upload = uploads[0] if uploads else None
    if upload is None:
        raise HTTPException(400, "no picture in the request: send it as the multipart/form-data file field 'file'")
    if not isinstance(upload, FormFile):
        raise HTTPException(400, "the field 'file' holds text; expected a file upload (the picture's bytes and its "
                                 "file name)")
    return upload


def query_flag(request: Request, name: str) -> bool:
    """A true/false query parameter (absent: false); 400 naming it for another value."""
    text = request.query_params.get(name)
    if text is None:
        return False
    if text.lower() not in FLAGS:
        raise HTTPException(400, f"?{name}={text[:40]!r}: expected true or false")
    return FLAGS[text.lower()]


def forward_of(predictor: Predictor) -> Forward:
    """The batch's forward pass; `predictor.probabilities` is looked up per pass, so a test can stand in for it."""
    def forward(images: np.ndarray) -> np.ndarray:
        return predictor.probabilities(images)
    return forward


def choose_model(by_name: dict[str, Predictor], name: Any, default: Predictor) -> Predictor:
    if name in (None, ""):
        return default
    if not isinstance(name, str):
        raise HTTPException(400, "the model field must be text (a model's name), not a file")
    if name not in by_name:
        raise HTTPException(404, f"no model named {name!r}; serving: {', '.join(by_name)}")
    return by_name[name]


def plain_name(filename: str | None) -> str:
    """The upload's file name, only echoed back: 400 for one with folders or control characters."""
    if not filename:
        return "upload"
    if ("/" in filename or "\\" in filename or filename in (".", "..") or len(filename) > MAX_NAME_CHARS
            or any(ord(c) < 32 or ord(c) == 127 for c in filename)):
        raise HTTPException(400, f"the file name {filename[:80]!r} must be a plain name: no folders, no control "
                                 f"characters, at most {MAX_NAME_CHARS} characters")
    return filename


async def answer(predictor: Predictor, batcher: Batcher, upload: bytes | IO[bytes], name: str, details: bool,
                 max_pixels: int) -> dict:
    """Prepare one upload (in a DECODING thread), predict it in a shared forward pass, and say what it is.

    The bytes go to the same reader as `cnnlab predict FILE` gets: one upload, one answer, either way.
    """
    loop = asyncio.get_running_loop()
    batcher.announce()  # on its way: a pass about to start waits for this image (up to max_wait_ms)
    try:
        # the upload stays in its spooled file (on disk past 1 MB) until a decoding slot is free: requests
        # waiting in line hold no more memory than that, whatever their number
        image = await loop.run_in_executor(DECODING, prepared_upload, predictor, upload, name, max_pixels)
    except BaseException:
        batcher.retract()
        raise
    prediction = Prediction(name, image, await probabilities(batcher, image), predictor.classes)
    result = prediction.to_dict()
    if details:
        panels = await loop.run_in_executor(DECODING, feature_map_panels, predictor, prediction)
        result.update(model=predictor.name, input_image=png_data_url(prediction.image), feature_maps=panels)
    return result


async def probabilities(batcher: Batcher, image: np.ndarray) -> np.ndarray:
    """The (announced) image's class probabilities from its model's next shared pass: 503 when the queue is full,
    504 when the answer takes longer than the timeout (the request leaves the queue; the client is not kept hanging)."""
    try:
        pending = batcher.submit(image, announced=True)
    except QueueFull:
        raise busy(batcher) from None
    seconds = batcher.settings.timeout_s
    try:
        return await asyncio.wait_for(asyncio.wrap_future(pending), seconds)
    except ModelOutputError as exc:  # the model's fault, not the request's: said, not hidden in the log
        raise HTTPException(500, str(exc)) from None
    except asyncio.TimeoutError:  # (the builtin TimeoutError only from Python 3.11)
        batcher.withdraw(pending)
        raise HTTPException(504, f"model {batcher.name!r} did not answer within {seconds:g} s: the server is "
                                 "overloaded; try again later") from None


def busy(batcher: Batcher) -> HTTPException:
    return HTTPException(503, f"the server is busy: {batcher.settings.queue_size} requests are already waiting for "
                              f"model {batcher.name!r}; retry in {RETRY_AFTER_SECONDS} s",
                         headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def prepared_upload(predictor: Predictor, upload: bytes | IO[bytes], name: str, max_pixels: int) -> np.ndarray:
    """The upload (its bytes, or the form's spooled file) as the model must see it (uint8 (H, W[, C])); image
    errors become 4xx HTTPExceptions."""
    data = upload if isinstance(upload, bytes) else upload.read()
    check_format(data, name)
    try:
        return predictor.prepare(data, name, max_pixels)
    except ImageTooLarge as exc:
        raise HTTPException(413, str(exc)) from None
    except ImageReadError as exc:
        raise HTTPException(400, f"{exc}; accepted formats: {ACCEPTED}") from None
    except BlankImage as exc:
        raise HTTPException(422, f"{name}: {exc}") from None
    except (MemoryError, RecursionError):
        raise
    except Exception as exc:  # noqa: BLE001  a decoder's own error on malformed bytes (struct.error, ...): bad input
        log.warning("%s: the decoder failed with %s: %s", name, type(exc).__name__, exc)
        raise HTTPException(400, f"{name}: not a readable image ({type(exc).__name__} while decoding)") from None


def check_format(data: bytes, name: str) -> None:
    """400 for an empty upload, 415 for a format outside ACCEPTED_FORMATS (judged from the bytes)."""
    if not data:
        raise HTTPException(400, f"{name}: the file is empty")
    detected = detected_format(data)
    if detected is not None and detected not in ACCEPTED_FORMATS:
        raise HTTPException(415, f"{name}: {detected} files are not accepted; send one of: {ACCEPTED}")


def detected_format(data: bytes) -> str | None:
    """Pillow's name for the bytes' format from their header (no pixels decoded); None when it knows none.

    PDF and SVG, which Pillow does not read, are named too, so a user learns what to send instead.
    """
    if data.startswith(b"%PDF-"):
        return "PDF"
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if head.startswith((b"<?xml", b"<svg", b"<!doctype svg")) and b"<svg" in head:
        return "SVG"
    try:  # (no warnings.catch_warnings here: it is not thread-safe, and the reader judges the size anyway)
        with Image.open(io.BytesIO(data)) as probe:
            return probe.format
    except Exception:  # noqa: BLE001  unreadable, or a bomb's header: the reader, run next, says why with the status
        return None


# ------------------------------------------------------------------------------- pictures for the page
def feature_map_panels(predictor: Predictor, prediction: Prediction) -> list[dict]:
    """Each conv layer's activated output for the prepared image: a title and up to 32 maps as PNGs."""
    from cnnlab.inspect.activations import feature_maps

    with predictor.inference_lock:
        result = feature_maps(predictor.model, prediction.image)
    panels = []
    for layer, maps in result.maps.items():  # maps: float (C, H, W)
        shown = maps[:MAX_MAPS_SHOWN]
        panels.append(dict(layer=layer, title=result.titles.get(layer, layer), count=int(maps.shape[0]),
                           height=int(maps.shape[1]), width=int(maps.shape[2]),
                           maps=[png_data_url(colour_map(m, *layer_range(shown))) for m in shown]))
    return panels


def layer_range(maps: np.ndarray) -> tuple[float, float]:
    """One scale per layer, so the maps of a layer compare in strength (as in `cnnlab show features`)."""
    low, high = float(maps.min()), float(maps.max())
    return low, high if high > low else low + 1.0


def colour_map(fmap: np.ndarray, low: float, high: float) -> np.ndarray:
    """uint8 RGB (H, W, 3) of one map in matplotlib's magma (dark = weak, bright = strong response)."""
    from matplotlib import colormaps

    scaled = np.clip((fmap - low) / (high - low), 0.0, 1.0)
    return (colormaps["magma"](scaled)[:, :, :3] * 255).astype(np.uint8)
