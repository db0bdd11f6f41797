"""What the demo page accepts and keeps (issue 41 M5): Gradio's /gradio_api/upload stores any file a
client posts and answers with its absolute server path. UploadGuard, ASGI middleware around the
serving app:

- keeps only images (recognised by content, the runtime's formats): anything else is removed at
  once and answered 415;
- bounds what all uploads keep together (MAX_KEPT; Gradio's cache sweep removes each after ten
  minutes and at shutdown): past it, the new upload is removed and answered 503;
- shows no server path: a reply names an upload as `upload/HASH/NAME`, and the requests that hand
  it back (the page's calls, the preview at /gradio_api/file=) are rewritten to the real path on
  the way in, so the page and gradio_client work unchanged.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import json
import os
from pathlib import Path

MAX_KEPT = 256 * 2**20           # bytes all uploads may keep at once
MAX_FILES = 2000                 # files all uploads may keep at once (a 1x1 PNG is 70 bytes)
KEEP_S = 660                     # Gradio sweeps uploads after 600 s (build_demo's delete_cache), + a minute
TOKEN = "upload/"                # what a client sees instead of the upload folder's path
UPLOAD = "/gradio_api/upload"
CALLS = ("/gradio_api/queue/join", "/gradio_api/call/", "/gradio_api/run/")
FILE_ROUTE = "/gradio_api/file="
CONFIGS = ("/config", "/gradio_api/config")     # the page's description: names the examples' files
MAX_CALL_BODY = 1 * 2**20        # a call names files; it carries no file bytes


def upload_folder() -> Path:
    from gradio.utils import get_upload_folder
    return Path(os.path.realpath(get_upload_folder()))


def _files(root: Path) -> list[Path]:
    return [Path(dirpath, name) for dirpath, _, names in os.walk(root) for name in names]


@functools.lru_cache(maxsize=1)
def _example_bytes() -> dict[int, set[bytes]]:
    """The shipped example images by size (read once: they are the package's own files)."""
    out: dict[int, set[bytes]] = {}
    for p in (Path(__file__).resolve().parents[1] / "examples").glob("*.png"):     # runtime/examples
        data = p.read_bytes()
        out.setdefault(len(data), set()).add(data)
    return out


def _folder_usage(root: Path) -> tuple[int, int]:
    """(bytes, files) that all uploads keep. An upload lives ten minutes (Gradio's sweep): a file
    older than KEEP_S was left by a server that was killed before its sweep, and is removed here
    so that orphans neither stay for ever nor count against the cap. Walks the folder: call it
    off the event loop."""
    import time
    total = count = 0
    old = time.time() - KEEP_S
    examples = _example_bytes()
    for path in _files(root):
        try:
            st = os.lstat(path)
            # the page's own examples, which Gradio caches here once and reuses, are never orphans
            if st.st_mtime < old and not (st.st_size in examples and path.read_bytes() in examples[st.st_size]):
                path.unlink()
                continue
            total += st.st_size
            count += 1
        except OSError:                          # swept meanwhile
            pass
    return total, count


def _is_image(path: Path) -> bool:
    """Recognised by content as one of the formats the runtime decodes (a header check; the
    runtime decodes it fully when a question comes)."""
    import io

    from PIL import Image

    from qgmrn.image_structure import check_structure
    from qgmrn.preprocess import FORMATS
    try:
        if not path.is_file() or path.is_symlink():
            return False
        data = path.read_bytes()
        check_structure(data, path.name)         # bounded work before Pillow walks the file
        with Image.open(io.BytesIO(data), formats=FORMATS):
            return True
    except Exception:                            # anything Pillow refuses or half-reads
        return False


def _remove(paths: list[Path], root: Path) -> None:
    for p in paths:
        p.unlink(missing_ok=True)
        parent = p.parent
        if parent != root and parent.parent == root:     # Gradio's per-content HASH folder, once empty
            try:
                parent.rmdir()
            except OSError:
                pass


def _relative_path(body: bytes) -> str | None:
    """The first file path in a call's JSON that is neither an upload token nor absolute."""
    try:
        todo = [json.loads(body)]
    except (ValueError, RecursionError):
        return None                                    # Gradio answers a malformed body itself
    while todo:
        item = todo.pop()
        if isinstance(item, dict):
            p = item.get("path")
            if isinstance(p, str) and not p.startswith((TOKEN, "/")) and "://" not in p:
                return p
            todo += item.values()
        elif isinstance(item, list):
            todo += item
    return None


async def _reply(send, status: int, body) -> None:
    # Gradio's upload route answers its errors in plain text, and the page shows that text
    data, kind = (body["error"].encode(), b"text/plain; charset=utf-8") if isinstance(body, dict) and status >= 400 \
        else (json.dumps(body).encode(), b"application/json")
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class _Held:
    """An ASGI send that holds the wrapped app's response, so the guard looks at it (and may
    replace it) before the client sees anything."""

    def __init__(self):
        self.start: dict = {}
        self.chunks: list[bytes] = []

    async def __call__(self, message) -> None:
        if message["type"] == "http.response.start":
            self.start.update(message)
        elif message["type"] == "http.response.body":
            self.chunks.append(message.get("body", b""))

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)


class UploadGuard:
    def __init__(self, app, max_kept: int = MAX_KEPT, max_files: int = MAX_FILES):
        self.app, self.max_kept, self.max_files = app, max_kept, max_files

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith(FILE_ROUTE + TOKEN):
            root = upload_folder()
            real = Path(os.path.realpath(root / path[len(FILE_ROUTE + TOKEN):]))
            if not real.is_relative_to(root):
                return await _reply(send, 404, {"error": "no such upload"})
            route = FILE_ROUTE + str(real)
            scope = {**scope, "path": route, "raw_path": route.encode()}
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and path in CONFIGS:
            return await self._config(scope, receive, send)
        if scope["method"] == "POST" and path == UPLOAD:
            return await self._upload(scope, receive, send)
        if scope["method"] == "POST" and any(path.startswith(c) for c in CALLS):
            return await self._call(scope, receive, send)
        return await self.app(scope, receive, send)

    async def _upload(self, scope, receive, send):
        reply = _Held()
        root = upload_folder()
        # Gradio names an upload by its content's hash: an identical file kept earlier is the
        # same path, and refusing this upload must not remove it
        earlier = set(await asyncio.to_thread(_files, root))     # nothing that walks or parses runs on the loop
        try:
            await self.app(scope, receive, reply)        # Gradio stores the files (and moves them)
            full = reply.start.get("status") == 500 and b"No space left on device" in reply.body
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            full = True
        if full:                                         # the disk, not the model: a 507, and no partial file
            _remove(sorted(set(await asyncio.to_thread(_files, root)) - earlier), root)
            return await _reply(send, 507, {"error": "the server's disk is full (no space left for uploads); "
                                                          "retry later"})
        if reply.start.get("status") != 200:
            await send(reply.start)
            await send({"type": "http.response.body", "body": reply.body})
            return
        try:
            names = json.loads(reply.body)
            stored = [Path(os.path.realpath(p)) for p in names]
        except (ValueError, TypeError):
            return await _reply(send, 500, {"error": "the upload could not be stored"})
        inside = [p for p in stored if p.is_relative_to(root)]
        new = [p for p in inside if p not in earlier]
        if len(inside) != len(stored):
            _remove(new, root)
            return await _reply(send, 500, {"error": "the upload could not be stored"})
        bad = await asyncio.to_thread(lambda: [p for p in stored if not _is_image(p)])
        if bad:
            _remove(new, root)
            from qgmrn.preprocess import FORMATS
            return await _reply(send, 415, {"error": f"the page takes images only ({', '.join(FORMATS)}, "
                                                          f"recognised by content): {bad[0].name[:80]} is not one"})
        kept, files = await asyncio.to_thread(_folder_usage, root)
        if kept > self.max_kept or files > self.max_files:
            _remove(new, root)
            return await _reply(send, 503, {"error": f"the page keeps at most {self.max_kept // 2**20} MB and "
                                                          f"{self.max_files} files of uploads (each for ten minutes); "
                                                          "retry shortly"})
        await _reply(send, 200, [TOKEN + str(p.relative_to(root)) for p in stored])

    async def _config(self, scope, receive, send):
        """The page's description with the examples' files named as uploads are (upload/HASH/NAME):
        no server path; the file route and the calls map the name back."""
        reply = _Held()
        await self.app(scope, receive, reply)
        body = reply.body
        headers = reply.start.get("headers", [])
        if not dict(headers).get(b"content-encoding"):
            body = body.replace(str(upload_folder()).encode() + b"/", TOKEN.encode())
        headers = [(k, v) for k, v in headers if k != b"content-length"]
        await send({**reply.start, "headers": headers + [(b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def _call(self, scope, receive, send):
        """A call names its files by the token the upload gave; hand the app the real path."""
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > MAX_CALL_BODY:
                return await _reply(send, 413, {"error": f"a call to the page is at most {MAX_CALL_BODY} "
                                                              "bytes (upload images first)"})
            if not message.get("more_body", False):
                break
        real = str(upload_folder()).encode() + b"/"
        body = b"".join(parts)
        relative = _relative_path(body)
        if relative is not None:                        # Gradio's own error would name the server's folder
            return await _reply(send, 400, {"error": f"a call names an uploaded file by what its upload returned "
                                                          f"({TOKEN}...), not {relative[:60]!r}"})
        for key in (b'"path":"', b'"path": "'):          # a file's path only (JSON.stringify, json.dumps)
            body = body.replace(key + TOKEN.encode(), key + real)
        headers = [(k, v) for k, v in scope["headers"] if k != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app({**scope, "headers": headers}, replay, send)
