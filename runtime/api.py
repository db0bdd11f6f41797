"""The HTTP API, one FastAPI app whichever engine serves it (runtime.serve: in-process on uvicorn,
or on Ray Serve). Every endpoint, limit and client-error message is written here, once.

    POST /answer   multipart form (file field `image`, field `question`, optional `top_k`) or JSON
                   {"image": BASE64 or data URL, "question": "...", "top_k": 5} -> runtime.predict's fields
    GET  /healthz  {"status": "ok"} (HEAD too)
    GET  /model    the model's card: backend, answers, vocabulary size, metadata
    GET  /stats    requests answered, batches run, mean batch size, large decodes at once

An engine is an `Answerer` with its own `submit` (how requests share batches). Bad requests get a
4xx with {"error": one message} and never reach a batch.
"""

import asyncio
import base64
import binascii
import json
import logging
import math
import re
import time
from pathlib import Path

from .decoding import LARGE_DECODES, LARGE_IMAGE_PIXELS, DecodeRefused, Decoder
from .errors import QuestionError

MAX_BODY = 20 * 2**20               # bytes per request: a 12 MP JPEG fits, a video does not
MAX_BUFFERED = 256 * 2**20          # body bytes held across all requests at once: past it, a 503
BODY_SECONDS = 15.0                 # the whole body must arrive within this; a stalled upload is 408
MAX_QUESTION_CHARS = 1000           # the model's token limit decides; this stops megabyte "questions"
MAX_TOP_K = 100
MAX_FIELDS = 5
ENDPOINTS = "use POST /answer, GET /healthz, GET /model or GET /stats"

log = logging.getLogger("qgmrn.serve")


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _short(raw) -> str:
    text = repr(raw)
    return text if len(text) <= 40 else text[:37] + "..."


def parse_top_k(raw) -> int:
    """An integer in 1..MAX_TOP_K: a JSON number or a form field of digits; nothing else."""
    if raw is None or raw == "":
        return 5
    value = None
    if isinstance(raw, int) and not isinstance(raw, bool):
        value = raw
    elif isinstance(raw, float) and math.isfinite(raw) and raw.is_integer():
        value = int(raw)
    elif isinstance(raw, str) and re.fullmatch(r"\s*\+?\d{1,4}\s*", raw):
        value = int(raw)
    if value is None or not 1 <= value <= MAX_TOP_K:
        raise BadRequest(400, f"top_k must be an integer in 1..{MAX_TOP_K}, got {_short(raw)}")
    return value


def check_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise BadRequest(400, "give a non-empty question")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadRequest(413, f"the question has {len(question)} characters; at most {MAX_QUESTION_CHARS}")
    try:
        question.encode("utf-8")
    except UnicodeEncodeError:                          # a lone surrogate ("\ud800" in JSON)
        raise BadRequest(400, "the question is not valid Unicode text (it holds a lone surrogate)") from None
    return question


def decode_base64(text: str) -> bytes:
    """Base64 as clients send it: one line, wrapped at 76 columns (`base64 FILE`), or a data URL."""
    text = text.strip()
    if text.startswith("data:"):
        head, comma, text = text.partition(",")
        if not comma or not head.endswith(";base64"):
            raise BadRequest(400, "a data URL image must look like data:image/png;base64,<data>")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(400, "the image is not valid base64") from None


async def _reply(send, status: int, message: str) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class BodyLimit:
    """ASGI middleware that holds the body limits wherever the body is read: a Content-Length over
    `limit` is a 413 before any of the body is asked for (no 100 Continue), a chunked body is a 413
    as soon as it passes `limit`, and a body that has not all arrived within `seconds` is a 408. It
    wraps the app on both engines, and Ray Serve's HTTP proxy too (which reads whole bodies before a
    replica sees them): `proxy_middlewares()`."""

    def __init__(self, app, limit: int = MAX_BODY, seconds: float = BODY_SECONDS, total: int = MAX_BUFFERED):
        self.app, self.limit, self.seconds, self.total = app, limit, seconds, total
        self.buffered = 0                               # body bytes held by every request in flight

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            return await _reply(send, 413, f"the request body has {int(length)} bytes; at most {self.limit}")
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.seconds
        state = {"received": 0, "complete": False, "answered": False}

        async def guarded_send(message):
            if not state["answered"]:                   # once refused here, the app's reply is dropped
                await send(message)

        async def refuse(status: int, message: str) -> dict:
            state["answered"] = True
            await _reply(send, status, message)
            return {"type": "http.disconnect"}

        async def guarded_receive():
            if state["answered"]:
                return {"type": "http.disconnect"}
            if state["complete"]:                       # after the body: waiting for a disconnect, no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return await refuse(408, f"the request body did not arrive within {self.seconds:g} s")
            if message["type"] == "http.request":
                n = len(message.get("body", b""))
                state["received"] += n
                self.buffered += n
                if state["received"] > self.limit:
                    return await refuse(413, f"the request body is over {self.limit} bytes")
                if self.buffered > self.total:
                    return await refuse(503, f"the server holds {self.total // 2**20} MB of uploads already; "
                                             "retry shortly")
                state["complete"] = not message.get("more_body", False)
            return message
        try:
            await self.app(scope, guarded_receive, guarded_send)
        finally:
            self.buffered -= state["received"]


def proxy_middlewares() -> list:
    """Ray Serve's HTTP proxy with our body limits: runtime.serve passes these in http_options;
    with `serve run`, set RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH=runtime.api:proxy_middlewares.
    Ray calls this in its proxy actor before it builds the proxy's uvicorn server: the header
    deadline and the connection cap of the local engine go in there too (issue 41, M3)."""
    from starlette.middleware import Middleware
    _guard_proxy_connections()
    return [Middleware(BodyLimit)]


def _guard_proxy_connections() -> None:
    """In this process, every uvicorn server built from here on without its own `http` protocol or
    `limit_concurrency` gets runtime.protocol's: a client whose headers have not arrived within
    HEADER_SECONDS is closed, and past MAX_CONNECTIONS a request is a 503. Ray Serve's proxy builds
    uvicorn.Config(...) through the module attribute, so wrapping it is enough."""
    try:
        import uvicorn
        from .protocol import MAX_CONNECTIONS, HeaderDeadline
    except ImportError:                                 # httptools missing: uvicorn's defaults stay
        return
    if getattr(uvicorn.Config, "_qgmrn_guarded", False):
        return
    base = uvicorn.Config

    class GuardedConfig(base):                          # type: ignore[misc, valid-type]
        _qgmrn_guarded = True

        def __init__(self, *args, **kwargs):
            kwargs.setdefault("http", HeaderDeadline)
            kwargs.setdefault("limit_concurrency", MAX_CONNECTIONS)
            super().__init__(*args, **kwargs)

    uvicorn.Config = GuardedConfig                      # type: ignore[misc]


async def read_body(request) -> bytes:
    """The body (BodyLimit, around the app, bounds its size and time)."""
    from starlette.requests import ClientDisconnect
    try:
        return await request.body()
    except ClientDisconnect:                            # nobody to answer; not the server's error
        raise BadRequest(400, "the client closed the connection before sending its whole body") from None


def _no_constants(name: str):
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> tuple[bytes, str, int]:
    try:
        data = json.loads(body, parse_constant=_no_constants)
    except RecursionError:
        raise BadRequest(400, "the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError):             # JSONDecodeError, NaN/Infinity, 5,000-digit ints
        raise BadRequest(400, "the body is not valid JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("image"), str):
        raise BadRequest(400, 'JSON bodies are {"image": BASE64, "question": "...", "top_k": 5}')
    return decode_base64(data["image"]), check_question(data.get("question")), parse_top_k(data.get("top_k"))


async def parse_multipart(headers, body: bytes) -> tuple[bytes, str, int]:
    from starlette.formparsers import MultiPartException, MultiPartParser
    from starlette.datastructures import UploadFile

    async def chunks():
        yield body
    parser = MultiPartParser(headers, chunks(), max_files=1, max_fields=MAX_FIELDS, max_part_size=MAX_BODY)
    try:
        form = await parser.parse()
    except MultiPartException as e:                     # two files, too many fields, no boundary
        raise BadRequest(400, f"the multipart form is not accepted: {e}") from None
    except Exception as e:                              # the parser's own errors on garbage input
        raise BadRequest(400, f"the multipart form is malformed ({type(e).__name__})") from None
    upload = form.get("image")
    if not isinstance(upload, UploadFile):
        raise BadRequest(400, "give the image as a file field named 'image'")
    fields = {k: form.get(k) for k in ("question", "top_k")}
    if any(isinstance(v, UploadFile) for v in fields.values()):
        raise BadRequest(400, "question and top_k are text fields, not files")
    image = await upload.read()
    return image, check_question(fields["question"]), parse_top_k(fields["top_k"])


async def read_request(request) -> tuple[bytes, str, int]:
    """(image bytes, question, top_k) from a multipart form or a JSON body; BadRequest otherwise."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data"):
        raise BadRequest(415, f"content type {_short(ctype) if ctype else 'none'} is not accepted: send "
                              "multipart/form-data or application/json")
    body = await read_body(request)
    if ctype == "application/json":
        return parse_json(body)
    return await parse_multipart(request.headers, body)


class Answerer:
    """What every engine shares: the model, request checks, decoding, the card and the statistics.
    An engine adds `submit(item) -> dict`, which puts the item in a batch and awaits its answer."""

    def __init__(self, model="builtin"):
        """model: a runtime.Model, or what runtime.load takes."""
        import runtime
        self.model = model if isinstance(model, runtime.Model) else runtime.load(model)
        self.started = time.time()
        self.counts = {"answered": 0, "batches": 0}
        self.decoder = Decoder()

    async def submit(self, item: tuple) -> dict:
        raise NotImplementedError

    async def answer(self, image: bytes, question: str, top_k: int) -> dict:
        self.check_question(question)          # a table look-up per word: cheaper inline than a thread hop
        pixels = await self.decode(image)
        return await self.submit((pixels, question, top_k))

    def check_question(self, question: str) -> None:
        from qgmrn.preprocess import encode_batch
        try:
            encode_batch(self.model.vocab, [question], self.model.max_question_len)
        except QuestionError as e:
            raise BadRequest(400, str(e)) from None

    async def decode(self, image: bytes):
        """The image decoded in the engine's decoding threads (runtime.decoding): never on the loop."""
        try:
            return await self.decoder.decode(image)
        except DecodeRefused as e:
            raise BadRequest(e.status, str(e)) from None

    def run_batch(self, items: list) -> list[dict]:
        """The model on one batch of checked items (blocking: engines call it off the event loop)."""
        top = max(k for _, _, k in items)
        preds = self.model.predict_batch([p for p, _, _ in items], [q for _, q, _ in items], top_k=top,
                                         batch_size=len(items))
        self.counts["answered"] += len(items)
        self.counts["batches"] += 1
        out = []
        for pred, (_, _, k) in zip(preds, items):
            d = pred.to_dict()
            d["top_k"] = d["top_k"][:k]
            d["batch_size"] = len(items)
            out.append(d)
        return out

    def card(self) -> dict:
        m = self.model
        meta = {k: v for k, v in m.metadata.items() if k not in ("vocab", "answers")}
        return {"model": Path(m.path).name, "backend": m.backend, "backend_reason": m.backend_reason,
                "answers": m.answers, "vocabulary_size": len(m.vocab), "image_size": m.image_size,
                "max_question_len": m.max_question_len, "metadata": meta}

    def stats(self) -> dict:
        c = self.counts
        c = {**c, "large_decodes_max": self.decoder.large_max}
        return {**c, "mean_batch": c["answered"] / c["batches"] if c["batches"] else None,
                "uptime_s": round(time.time() - self.started, 1),
                "limits": {"max_body": MAX_BODY, "body_seconds": BODY_SECONDS, "large_image_pixels": LARGE_IMAGE_PIXELS,
                           "large_decodes": LARGE_DECODES,
                           "decode_threads": self.decoder.threads}}


METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")


def make_app(engine: Answerer):
    """The FastAPI app over `engine` (runtime.engines.build_asgi adds the browser page at /)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    app = FastAPI(title="qgmrn", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException):       # 404, 405 in our own words
        return JSONResponse({"error": f"{request.method} {request.url.path}: {ENDPOINTS}"}, status_code=exc.status_code)

    @app.exception_handler(BadRequest)
    async def bad_request(request: Request, exc: BadRequest):
        return JSONResponse({"error": str(exc)}, status_code=exc.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception):
        log.exception("POST /answer failed")
        return JSONResponse({"error": f"the model failed on this request: {exc}"}, status_code=500)

    @app.api_route("/healthz", methods=["GET", "HEAD"])
    async def healthz():
        return {"status": "ok"}

    @app.api_route("/model", methods=["GET", "HEAD"])
    async def model_card():
        return engine.card()

    @app.api_route("/stats", methods=["GET", "HEAD"])
    async def stats():
        return engine.stats()

    @app.post("/answer")
    async def answer(request: Request):
        image, question, top_k = await read_request(request)
        return await engine.answer(image, question, top_k)

    # Another method on an API path is a 405 in our words (a page mounted at / would otherwise take it)
    async def _wrong_method(request: Request):
        raise BadRequest(405, f"{request.method} {request.url.path}: {ENDPOINTS}")
    for path, allowed in (("/answer", {"POST"}), ("/healthz", {"GET", "HEAD"}), ("/model", {"GET", "HEAD"}),
                          ("/stats", {"GET", "HEAD"})):
        app.add_api_route(path, _wrong_method, methods=sorted(set(METHODS) - allowed), include_in_schema=False)
    return app
