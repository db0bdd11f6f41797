"""Answers over HTTP on Ray Serve: replicas of the torch-free runtime, requests batched dynamically.

    pip install 'qgmrn[serve]'
    python -m runtime.serve [--model PATH] [--host 127.0.0.1] [--port 8000] [--replicas N]
                            [--max-batch 16] [--batch-wait-ms 5] [--address ray://HEAD:10001]
    serve run runtime.serve:build_app model=PATH replicas=2     # Ray's own CLI and config files

Endpoints:
    POST /answer   multipart form (file field `image`, field `question`, optional `top_k`) or JSON
                   {"image": BASE64, "question": "...", "top_k": 5} -> the fields of runtime.predict
    GET  /healthz  {"status": "ok"}
    GET  /model    the model's card: backend, answers, vocabulary size, metadata

Requests are batched per replica (@serve.batch) into Model.predict_batch; answers equal serial
runtime.answer calls. Bad requests get a 4xx with one message and never reach a batch.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import signal
import sys
import time

from .errors import ImageError, ModelError, QuestionError

MAX_BODY = 20 * 2**20               # bytes per request: a 12 MP JPEG fits, a video does not
MAX_QUESTION_CHARS = 1000           # the model's token limit decides; this stops megabyte "questions"
MAX_TOP_K = 100


class BadRequest(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def _import_serve():
    try:
        from ray import serve
        from starlette.requests import Request  # noqa: F401
        from starlette.responses import JSONResponse  # noqa: F401
    except ImportError as e:
        raise SystemExit("error: serving needs Ray Serve: pip install 'qgmrn[serve]'") from e
    return serve


def parse_top_k(raw) -> int:
    if raw is None or raw == "":
        return 5
    try:
        top_k = int(raw) if not isinstance(raw, bool) and float(raw) == int(float(raw)) else None
    except (TypeError, ValueError):
        top_k = None
    if top_k is None or not 1 <= top_k <= MAX_TOP_K:
        raise BadRequest(400, f"top_k must be an integer in 1..{MAX_TOP_K}, got {raw!r}")
    return top_k


def check_question(question) -> str:
    if not isinstance(question, str) or not question.strip():
        raise BadRequest(400, "give a non-empty question")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadRequest(413, f"the question has {len(question)} characters; at most {MAX_QUESTION_CHARS}")
    return question


async def read_request(request) -> tuple[bytes, str, int]:
    """(image bytes, question, top_k) from a multipart form or a JSON body; BadRequest otherwise."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY:
        raise BadRequest(413, f"the request body has {int(length)} bytes; at most {MAX_BODY}")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "application/json":
        body = await request.body()
        if len(body) > MAX_BODY:
            raise BadRequest(413, f"the request body has {len(body)} bytes; at most {MAX_BODY}")
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest(400, "the body is not valid JSON") from None
        if not isinstance(data, dict) or not isinstance(data.get("image"), str):
            raise BadRequest(400, 'JSON bodies are {"image": BASE64, "question": "...", "top_k": 5}')
        try:
            image = base64.b64decode(data["image"], validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, "the image is not valid base64") from None
        return image, check_question(data.get("question")), parse_top_k(data.get("top_k"))
    if ctype == "multipart/form-data":
        form = await request.form(max_files=1, max_fields=5, max_part_size=MAX_BODY)
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise BadRequest(400, "give the image as a file field named 'image'")
        image = await upload.read()
        return image, check_question(form.get("question")), parse_top_k(form.get("top_k"))
    raise BadRequest(415, f"content type {ctype or 'none'} is not accepted: send multipart/form-data or "
                          "application/json")


class AnswerServer:
    """The deployment: one runtime.Model per replica; /answer requests batched into predict_batch."""

    def __init__(self, model: str = "builtin", max_batch: int = 16, batch_wait_ms: float = 5.0):
        import runtime
        self.model = runtime.load(model)
        self.answer_batch.set_max_batch_size(max_batch)
        self.answer_batch.set_batch_wait_timeout_s(batch_wait_ms / 1000.0)

    async def __call__(self, request):
        from starlette.responses import JSONResponse
        path, method = request.url.path.rstrip("/") or "/", request.method
        try:
            if path == "/healthz" and method == "GET":
                return JSONResponse({"status": "ok"})
            if path == "/model" and method == "GET":
                return JSONResponse(self.card())
            if path == "/answer" and method == "POST":
                image, question, top_k = await read_request(request)
                # decoding off the event loop: Pillow releases the GIL, so requests decode in parallel
                pixels = await asyncio.to_thread(self.check, image, question)
                result = await self.answer_batch((pixels, question, top_k))
                return JSONResponse(result)
            raise BadRequest(404 if path not in ("/healthz", "/model", "/answer") else 405,
                             f"{method} {path}: use POST /answer, GET /healthz or GET /model")
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=e.status)

    def check(self, image: bytes, question: str):
        """Decode the image and encode the question now, so a bad request fails alone (a 4xx) and
        never takes a batch down with it."""
        from qgmrn.preprocess import encode_batch, load_rgb
        try:
            pixels = load_rgb(image)
            encode_batch(self.model.vocab, [question], self.model.max_question_len)
        except (ImageError, QuestionError) as e:
            raise BadRequest(413 if "megapixels" in str(e) else 400, str(e)) from None
        return pixels

    def card(self) -> dict:
        m = self.model
        meta = {k: v for k, v in m.metadata.items() if k not in ("vocab", "answers")}
        return {"model": m.path.name, "backend": m.backend, "answers": m.answers, "vocabulary_size": len(m.vocab),
                "image_size": m.image_size, "max_question_len": m.max_question_len, "metadata": meta}

    async def answer_batch(self, items: list) -> list[dict]:
        top = max(k for _, _, k in items)
        preds = await asyncio.to_thread(self.model.predict_batch, [p for p, _, _ in items],
                                        [q for _, q, _ in items], top_k=top, batch_size=len(items))
        out = []
        for pred, (_, _, k) in zip(preds, items):
            d = pred.to_dict()
            d["top_k"] = d["top_k"][:k]
            d["batch_size"] = len(items)
            out.append(d)
        return out


def deployment(replicas: int = 1, max_batch: int = 16, batch_wait_ms: float = 5.0):
    """The Ray Serve deployment class (built lazily: Ray is an optional extra)."""
    serve = _import_serve()
    cls = type("AnswerServer", (AnswerServer,), {
        "answer_batch": serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1000.0)(
            AnswerServer.answer_batch)})
    return serve.deployment(cls, name="qgmrn", num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=4 * max_batch)


def build_app(args: dict):
    """`serve run runtime.serve:build_app model=PATH replicas=2 max_batch=16 batch_wait_ms=5`."""
    replicas, max_batch = int(args.get("replicas", 1)), int(args.get("max_batch", 16))
    wait = float(args.get("batch_wait_ms", 5.0))
    return deployment(replicas, max_batch, wait).bind(args.get("model", "builtin"), max_batch, wait)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin", help="a bundle, an .onnx, or 'builtin' (default)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--address", help="a Ray cluster to join (default: start one on this machine)")
    a = ap.parse_args(argv)
    if a.replicas < 1 or a.max_batch < 1 or a.batch_wait_ms < 0 or not 0 < a.port < 65536:
        ap.error("--replicas and --max-batch must be at least 1, --batch-wait-ms not negative, --port in 1..65535")
    import runtime
    try:
        runtime.load(a.model)                     # a bad --model fails here, in one line, before Ray starts
    except (ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    serve = _import_serve()
    import ray
    stopping: list[int] = []

    def catch_signals():            # from the start, and again after Ray has set up its own
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: stopping.append(signum))
    catch_signals()
    ray.init(address=a.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    catch_signals()
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        app = build_app({"model": a.model, "replicas": a.replicas, "max_batch": a.max_batch,
                         "batch_wait_ms": a.batch_wait_ms})
        serve.run(app, name="qgmrn", route_prefix="/")
        catch_signals()
        if not stopping:            # a Ctrl-C during start-up stops it instead of being lost
            print(f"serving {a.model} on http://{a.host}:{a.port} ({a.replicas} replica(s), batches of up "
                  f"to {a.max_batch}, {a.batch_wait_ms:g} ms wait); Ctrl-C stops", flush=True)
        while not stopping:
            time.sleep(0.2)
    finally:
        serve.shutdown()
        ray.shutdown()
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
