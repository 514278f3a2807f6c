"""The HTTP application: `create_app({name: Captioner}, ServeSettings()) -> FastAPI`.

Endpoints: GET /health, GET /v1/models (what each model reads and decodes), POST /v1/captions (JSON
features, JSON {"scene": i} for one of the page's rendered scenes, or multipart image files), GET /metrics
(Prometheus text), GET / (a page to try the models on a photo or a rendered scene) and
GET /scenes/{i}.png. Every error is JSON {"error": message}; a request's problem never stops the server.
"""
from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from typing import Any, Coroutine

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from python_multipart.exceptions import FormParserError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from satic.captioner import Captioner, format_captions, pad_features
from satic.decoding import DecodeOptions
from satic.decoding.cache import longest_max_length
from satic.serve.batcher import Batcher, BatchFailed, BatchResult, QueueFull, ShuttingDown, unless
from satic.serve.inputs import (OPTION_FIELDS, BadRequest, check_count, check_features, check_scene,
                                choose_model, decode_options, open_upload, parse_json, return_scores, upload_label)
from satic.serve.metrics import ServeMetrics
from satic.serve.page import RenderedScene, page_html, render_scenes, scene_regions
from satic.serve.settings import Limits, ServeSettings


class BodyTooLarge(Exception):
    pass


class BodyTooSlow(Exception):
    pass


class BodyLimit:
    """ASGI middleware: a body longer than `max_bytes` is refused with 413, by its Content-Length at
    once, or while it streams in (chunked uploads); one still arriving `timeout_s` seconds after the request's
    headers (0: no limit) with 408, so a client that trickles its body holds no request forever."""

    def __init__(self, app, max_bytes: int, timeout_s: float = 0):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await too_large(self.max_bytes)(scope, receive, send)
        received, arrived, deadline = 0, False, time.monotonic() + self.timeout_s

        async def limited_receive():
            nonlocal received, arrived
            if arrived or not self.timeout_s:  # after the body, receive() waits for the client to leave
                message = await receive()
            else:
                try:
                    message = await asyncio.wait_for(receive(), max(deadline - time.monotonic(), 0))
                except asyncio.TimeoutError:
                    raise BodyTooSlow from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                arrived = not message.get("more_body", False)
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        await self.app(scope, limited_receive, send)


class RequestMetrics:
    """ASGI middleware: every answer to POST /v1/captions, whatever produced it (the body limit
    included), is counted by status; the endpoint leaves the model and image count of a captioned
    request in the request's state."""

    def __init__(self, app, metrics: ServeMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] != CAPTIONS_PATH:
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500

        async def send_noting_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_noting_status)
        finally:
            state = scope.get("state", {})
            self.metrics.request(status, time.perf_counter() - started, state.get("satic_model"),
                                 state.get("satic_images", 0))


CAPTIONS_PATH = "/v1/captions"
CLIENT_CLOSED = 499  # nginx's status for a client that went away before its answer


def too_large(max_bytes: int) -> JSONResponse:
    return error(413, f"the request body is larger than this server's limit of {max_bytes} bytes")


def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


class CaptionService:
    """The loaded models, the batcher that decodes for all of them (one worker thread, so models take
    turns on the cores), and the page's scenes. Batches are keyed by (model name, DecodeOptions)."""

    def __init__(self, models: dict[str, Captioner], settings: ServeSettings):
        if not models:
            raise ValueError("at least one model is needed")
        self.models = dict(models)
        self.settings = settings
        self.batcher = Batcher(self.run_batch, settings.max_batch, settings.max_wait_ms / 1000, settings.max_queue,
                               on_batch=lambda key, images, seconds: self.metrics.batch(key[0], images, seconds))
        self.metrics = ServeMetrics(lambda: self.batcher.queued_images, lambda: self.batcher.busy)
        self.scenes: list[RenderedScene] = render_scenes(settings.scenes)
        self.page = page_html(self.models, self.scenes)

    def run_batch(self, key: tuple[str, DecodeOptions], items: list) -> list:
        """One batch on the worker thread: pad the images' regions, decode, detokenise. For a decoder that
        records each batch shape (bf16, a GPU) the batch is filled up to a few fixed sizes
        (`decode_batch_size`) with copies of its last image, whose captions are dropped, since batches of every
        size from 1 to max_batch would each pay a recording once; a native decoder (fp32, int8 on the CPU)
        decodes the batch as it is. Batched decoding gives every image the caption it gets alone (bit for bit at
        fp32 and int8 on the CPU; with bf16 a near-tie may round either way), so the filling changes no caption
        beyond that. Each image's entry is {"caption", "score"}, or a list of them (n_best or sample_n above 1);
        requests that did not ask for scores get the text alone."""
        name, options = key
        captioner = self.models[name]
        size = decode_batch_size(len(items), self.settings.max_batch) if captioner.records_shapes else len(items)
        filled = items + [items[-1]] * (size - len(items))
        feats, masks = pad_features(filled)  # (B, N, D), (B, N) or None
        result = captioner.decode(feats, masks, options)
        return format_captions(result, captioner.vocab, options.rows_per_image, False, True,
                               options.remove_bad_endings)[:len(items)]

    @contextlib.asynccontextmanager
    async def lifespan(self, app: FastAPI):
        self.batcher.start()
        try:
            yield
        finally:
            await self.batcher.close()

    async def captions(self, request: Request) -> JSONResponse:
        try:
            return await self.answer(request)
        except asyncio.CancelledError:  # the server stops: its shutdown time ran out before this request's captions
            raise ShuttingDown("the server is shutting down and its shutdown time ran out before these captions "
                               "were ready") from None

    async def answer(self, request: Request) -> JSONResponse:
        started = time.perf_counter()
        if request.query_params:  # read nowhere: an option there would be silently ignored
            name = next(iter(request.query_params))
            raise BadRequest(400, f"query parameter {name!r}: this endpoint reads no query string; give options "
                                  "in the JSON body or as form fields")
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        try:
            if content_type == "multipart/form-data":
                name, options, scores, features = await self.from_images(request)
            elif content_type in ("application/json", ""):
                name, options, scores, features = await self.from_json(request, await request.body())
            else:
                raise BadRequest(415, f"content type {content_type!r}: send application/json (features) or "
                                      "multipart/form-data (image files)")
        except ClientDisconnect:  # nobody to answer; counted as nginx counts it
            raise BadRequest(CLIENT_CLOSED, "the client closed the connection before its request arrived") from None
        done = await self.decode(request, (name, options), features)
        check_scores(done.results, "image" if content_type == "multipart/form-data" else "features")
        request.state.satic_model, request.state.satic_images = name, len(features)  # for RequestMetrics
        captions = done.results if scores else [text_only(entry) for entry in done.results]
        return JSONResponse({"model": name, "captions": captions,
                             "ms": round((time.perf_counter() - started) * 1000, 3)})

    async def decode(self, request: Request, key: tuple[str, DecodeOptions], features: list) -> BatchResult:
        """The request's results from the batcher; a client that goes away while they are queued gives up its place
        (its images are decoded only if their batch has started) and is counted as nginx counts it."""
        return await unless_gone(request, self.batcher.submit(key, features), "its captions were ready")

    async def from_json(self, request: Request, body: bytes) -> tuple[str, DecodeOptions, bool, list]:
        fields = parse_json(body)
        name, captioner = choose_model(self.models, fields.get("model"))
        options, scores = decode_options(captioner, fields, self.settings.limits), return_scores(fields)
        if "scene" not in fields:
            booleans = b"true" in body or b"false" in body  # else no feature number can be one
            features = check_features(fields["features"], name, captioner, self.settings.limits, booleans)
            return name, options, scores, features
        rendered = self.scenes[check_scene(fields["scene"], len(self.scenes))]
        if captioner.features.kind == "grid":  # the scene's image, through the checkpoint's extractor
            scene = [(f"scene {rendered.index}", rendered.png)]
            return name, options, scores, await self.image_features(request, captioner, scene)
        return name, options, scores, [scene_regions(rendered, captioner)]

    async def from_images(self, request: Request) -> tuple[str, DecodeOptions, bool, list]:
        limits = self.settings.limits
        try:
            form = await request.form(max_files=limits.max_images, max_fields=len(OPTION_FIELDS),
                                      max_part_size=4096)
        except StarletteHTTPException as err:
            if "files" in str(err.detail).lower():
                raise BadRequest(413, f"too many images: at most {limits.max_images} files per request") from None
            if "maximum size" in str(err.detail).lower():  # a part without a filename is a text field
                raise BadRequest(400, f"multipart body: {err.detail} A text field (an option) is short: send each "
                                      "image as a file part, with a filename (curl -F image=@photo.jpg)") from None
            raise BadRequest(400, f"multipart body: {err.detail}") from None
        except FormParserError as err:  # older starlette (0.47) lets python-multipart's own error through
            raise BadRequest(400, f"multipart body: {err}") from None
        try:
            uploads, fields = [], {}
            for key, value in form.multi_items():
                if key == "image" and not isinstance(value, str):
                    uploads.append(value)
                elif key == "image":
                    raise BadRequest(400, f"image[{len(uploads)}]: sent as a text field; send each image as a file "
                                          "part, with a filename (curl -F image=@photo.jpg)")
                elif key in fields:
                    raise BadRequest(400, f"form field {key!r} given twice; give each option once")
                elif key in OPTION_FIELDS and isinstance(value, str):
                    fields[key] = value
                else:
                    raise BadRequest(400, f"unknown form field {key!r}; send one or more 'image' files and "
                                          f"optionally {', '.join(OPTION_FIELDS)}")
            if not uploads:
                raise BadRequest(400, "image: no image file in the form; send one or more files as 'image'")
            check_count(len(uploads), limits)
            name, captioner = choose_model(self.models, fields.get("model"))
            if captioner.features.kind != "grid":
                raise BadRequest(400, f"model: {name!r} reads precomputed {captioner.features.kind} region features, "
                                      "not images; send them as JSON 'features', or choose a model trained on "
                                      "features of the bundled backbone")
            options, scores = decode_options(captioner, fields, limits, form=True), return_scores(fields, form=True)
            blobs = [(upload_label(i, u.filename), await u.read()) for i, u in enumerate(uploads)]
        finally:
            await form.close()
        return name, options, scores, await self.image_features(request, captioner, blobs)

    async def image_features(self, request: Request, captioner: Captioner, blobs: list[tuple[str, bytes]]) -> list:
        """The grid features of image files, one (h*w, C) array each, extracted on the worker thread unless the
        client goes away first: then its images are not read (or no further one, once the extraction started)."""
        stop = threading.Event()  # set once nobody waits for the features
        try:
            att = await unless_gone(request, self.batcher.in_worker(extract, captioner, blobs, self.settings.limits,
                                                                    stop), "its images were read")  # (B, h*w, C)
        finally:
            stop.set()
        return list(att)


async def unless_gone(request: Request, work: Coroutine, before: str) -> Any:
    """`work`'s result, unless the client goes away first: then the work is cancelled (work queued for the worker
    thread never runs) and the request is counted as nginx counts it."""
    # one turn of the event loop first, so that a close already on the socket has been read: on Python 3.12+
    # the body's arrival takes no turn of its own (asyncio.wait_for runs it in this task), and without this turn
    # no client is ever found gone here
    await asyncio.sleep(0)
    if await request.is_disconnected():  # gone already: nothing is queued for it (an idle worker would start at once)
        work.close()
        raise BadRequest(CLIENT_CLOSED, f"the client closed the connection before {before}")
    done = await unless(work, disconnected(request.receive))
    if done.done() and not done.cancelled():
        return done.result()
    raise BadRequest(CLIENT_CLOSED, f"the client closed the connection before {before}")


async def disconnected(receive) -> None:
    """Returns once the client has gone: after a request's body, the server's next message is http.disconnect."""
    while (await receive())["type"] != "http.disconnect":
        pass


def check_scores(results: list, label: str) -> None:
    """Features far beyond the scale a model was trained on can overflow its float32 numbers: their captions mean
    nothing, and a NaN or infinite score has no JSON number. Refuse such an image, naming it."""
    for i, entry in enumerate(results):
        if not all(math.isfinite(row["score"]) for row in (entry if isinstance(entry, list) else [entry])):
            raise BadRequest(400, f"{label}[{i}]: the model's numbers overflow on these features (no finite score); "
                                  "send features at the scale it was trained on")


def text_only(entry: dict | list) -> str | list:
    """An image's {"caption", "score"} (or list of them) without the scores."""
    return [row["caption"] for row in entry] if isinstance(entry, list) else entry["caption"]


def model_info(name: str, captioner: Captioner) -> dict:
    """What a client needs to know to call a model: the features it reads and how it decodes by default."""
    features = captioner.features
    defaults = captioner.options(1)
    return {"name": name, "group_size": captioner.config.group_size, "vocab_size": len(captioner.vocab),
            "feature_kind": features.kind, "feature_dim": captioner.feature_dim,
            "norm_att_feat": features.norm_att_feat, "use_box": features.use_box,
            "takes_images": features.kind == "grid", "max_length": defaults.max_length,
            "longest_max_length": longest_max_length(captioner.config.max_positions, captioner.config.group_size),
            "precision": captioner.precision, "device": str(captioner.device),
            "ensemble_weights": captioner.weights}  # None for a single checkpoint


def decode_batch_size(images: int, max_batch: int) -> int:
    """The batch size `images` are decoded at: a power of two up to 4, then a multiple of 4 (never above
    max_batch, nor below images): at most 3 + max_batch / 4 sizes, and at most 3 filler images, so a
    compute-bound model loses little to the filling while a small one records few shapes."""
    size = 1 << (images - 1).bit_length() if images <= 4 else -(-images // 4) * 4
    return max(images, min(size, max_batch))


def extract(captioner: Captioner, blobs: list[tuple[str, bytes]], limits: Limits,
            stop: threading.Event | None = None):
    """Uploaded files -> the checkpoint's grid features, on the worker thread; None once `stop` is set (nobody
    waits for them), checked before each image."""
    extractor, images = captioner.extractor(), []
    for label, data in blobs:
        if stop is not None and stop.is_set():
            return None
        images.append(extractor.fit(open_upload(data, label, limits)))  # small as each is read
    return None if stop is not None and stop.is_set() else extractor(images)[0]


def create_app(models: dict[str, Captioner], settings: ServeSettings = ServeSettings()) -> FastAPI:
    """The application over loaded captioners (the first is the default model). Each captioner's
    `name` should be its public name: messages use it."""
    service = CaptionService(models, settings)
    app = FastAPI(title="satic", docs_url=None, redoc_url=None, lifespan=service.lifespan)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(RequestMetrics, metrics=service.metrics)  # outside the body limit: counts its 413s

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, err: BadRequest):
        return error(err.status, err.message)

    @app.exception_handler(QueueFull)
    async def queue_full(request: Request, err: QueueFull):
        return error(503, f"{err}; retry in {settings.retry_after_s} s",
                     headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(ShuttingDown)
    async def shutting_down(request: Request, err: ShuttingDown):
        return error(503, f"{err}; send the request again (to another replica, or once this one is back)",
                     headers={"Retry-After": str(settings.retry_after_s)})

    @app.exception_handler(BatchFailed)
    async def batch_failed(request: Request, err: BatchFailed):
        return error(500, f"decoding failed: {err}")

    @app.exception_handler(BodyTooLarge)
    async def body_too_large(request: Request, err: BodyTooLarge):
        return too_large(settings.max_body_bytes)

    @app.exception_handler(BodyTooSlow)
    async def body_too_slow(request: Request, err: BodyTooSlow):
        return error(408, f"the request body took longer to arrive than this server's limit of "
                          f"{settings.body_timeout_s:g} s; send it faster, or in smaller requests",
                     headers={"Connection": "close"})  # what still arrives of it is no next request

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        return error(err.status_code, str(err.detail), headers=getattr(err, "headers", None))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        return error(500, f"internal error: {type(err).__name__}: {err}")

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": list(service.models)}

    @app.get("/v1/models")
    async def models():
        return {"models": [model_info(name, captioner) for name, captioner in service.models.items()]}

    @app.post(CAPTIONS_PATH)
    async def captions(request: Request):
        return await service.captions(request)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(service.page)

    @app.get("/scenes/{index}.png")
    async def scene(index: str):
        if not (index.isascii() and index.isdigit() and len(index) < 6 and int(index) < len(service.scenes)):
            raise BadRequest(404, f"no scene {index!r}; this server renders scenes 0..{len(service.scenes) - 1}")
        return Response(service.scenes[int(index)].png, media_type="image/png")

    return app
