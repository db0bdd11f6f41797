"""The demo page's uploads (trust round 5): the page's description names no server path, a call
that names a file by a relative path gets our words (not Gradio's, which name the server's
folder), uploads are bounded in number, and a full disk is a 507 that leaves no partial file."""
import errno
import importlib.util
import json
from pathlib import Path

import pytest

HAVE_DEMO = all(importlib.util.find_spec(m) is not None for m in ("gradio", "fastapi", "httpx"))
pytestmark = pytest.mark.skipif(not HAVE_DEMO, reason="the demo extra is not installed (pip install -e '.[demo]')")


@pytest.fixture(scope="module")
def client():
    from fastapi.testclient import TestClient
    from runtime.engines import LocalEngine, build_asgi
    with TestClient(build_asgi(LocalEngine("builtin"))) as c:
        yield c


def _kept(root) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _png(colour=(10, 200, 30)) -> bytes:
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (6, 6), colour).save(buf, "PNG")
    return buf.getvalue()


def test_the_page_description_names_no_server_path_and_its_examples_still_preview(client):
    from runtime.demo.uploads import upload_folder
    r = client.get("/config")
    assert r.status_code == 200 and str(upload_folder()) not in r.text and "/tmp/" not in r.text
    tokens = {v["path"] for v in _walk(r.json()) if isinstance(v.get("path"), str) and v["path"].endswith(".png") and "://" not in v["path"]}
    assert tokens and all(t.startswith("upload/") for t in tokens)
    for t in tokens:
        assert client.get(f"/gradio_api/file={t}").status_code == 200


def _walk(item):
    if isinstance(item, dict):
        yield item
        for v in item.values():
            yield from _walk(v)
    elif isinstance(item, list):
        for v in item:
            yield from _walk(v)


def test_a_call_naming_a_relative_file_is_our_400_without_the_servers_folder(client):
    import os
    r = client.post("/gradio_api/call/answer", json={"data": [{"path": "foo.png", "meta": {"_type": "gradio.FileData"}},
                                                             "How many cubes?"]})
    assert r.status_code == 400 and "upload/" in r.text and os.getcwd() not in r.text


def test_uploads_are_bounded_in_number(client, monkeypatch):
    from runtime.demo import uploads
    guard = _guard(client.app)
    root = uploads.upload_folder()
    monkeypatch.setattr(guard, "max_files", len(_kept(root)))
    before = _kept(root)
    r = client.post("/gradio_api/upload", files={"files": ("n.png", _png((1, 2, 3)), "image/png")})
    assert r.status_code == 503 and "files" in r.text and _kept(root) == before


def test_a_full_disk_is_a_507_that_names_the_disk_and_leaves_no_partial_file(client, monkeypatch):
    import gradio.routes
    from runtime.demo import uploads
    root = uploads.upload_folder()
    before = _kept(root)

    async def full(request, folder, *args, **kwargs):             # Gradio writing the upload, disk full
        partial = Path(folder) / "partial" / "full.png"
        partial.parent.mkdir(parents=True, exist_ok=True)
        partial.write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gradio.routes, "upload_fn", full)
    r = client.post("/gradio_api/upload", files={"files": ("full.png", _png((9, 9, 9)), "image/png")})
    assert r.status_code == 507 and "disk is full" in r.text and "model" not in r.text
    assert _kept(root) == before


def _guard(app):
    from runtime.demo.uploads import UploadGuard
    node = app.middleware_stack
    while node is not None and not isinstance(node, UploadGuard):
        node = getattr(node, "app", None)
    assert node is not None
    return node


def test_an_example_answers_through_its_token(client):
    r = client.get("/config")
    token = next(v["path"] for v in _walk(r.json()) if isinstance(v.get("path"), str) and v["path"].endswith(".png") and "://" not in v["path"])
    call = client.post("/gradio_api/call/answer", json={"data": [{"path": token, "meta": {"_type": "gradio.FileData"}},
                                                                "How many cubes are there?"]})
    assert call.status_code == 200
    stream = client.get(f"/gradio_api/call/answer/{call.json()['event_id']}").text
    assert "event: complete" in stream, stream
    assert json.loads(stream.split("data:", 1)[1].split("\n")[0])[0]


def test_uploads_a_killed_server_left_behind_are_swept_and_not_counted(client, monkeypatch):
    """M4: after a SIGKILL the next server removed only its own files, and the orphans counted
    against every later upload's cap. Files older than an upload's ten minutes are swept."""
    import os
    import time
    from runtime.demo import uploads
    root = uploads.upload_folder()
    orphan = root / "deadbeef" / "left.png"
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(_png((4, 4, 4)))
    os.utime(orphan, (time.time() - 3600, time.time() - 3600))
    guard = _guard(client.app)
    monkeypatch.setattr(guard, "max_files", len([p for p in _kept(root) if p != orphan]) + 1)
    examples = [p for p in _kept(root) if p.name.startswith("scene")]
    for p in examples:                                     # Gradio's cached examples: old, yet kept
        os.utime(p, (time.time() - 3600, time.time() - 3600))
    r = client.post("/gradio_api/upload", files={"files": ("fresh.png", _png((5, 6, 7)), "image/png")})
    assert r.status_code == 200 and not orphan.exists()
    assert examples and all(p.exists() for p in examples)
