"""Trust, round 4 (issue 41): what a hostile or careless user did to the demo page, the server,
training and the runtime, each as a test that failed before its fix."""
import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

HAVE_DEMO = all(importlib.util.find_spec(m) is not None for m in ("gradio", "fastapi", "httpx"))
QUESTION = "How many cylinders are there?"
needs_demo = pytest.mark.skipif(not HAVE_DEMO, reason="the demo extra is not installed (pip install -e '.[demo]')")


@pytest.fixture(scope="module")
def demo_client():
    """The serving app with the page at /, in this process, as a client reaches it over HTTP."""
    if not HAVE_DEMO:
        pytest.skip("the demo extra is not installed (pip install -e '.[demo]')")
    from fastapi.testclient import TestClient
    from runtime.engines import LocalEngine, build_asgi
    with TestClient(build_asgi(LocalEngine("builtin"))) as client:
        yield client


def _call(client, endpoint: str, data: list) -> tuple[str, str]:
    """(event, data) of one call through Gradio's HTTP API (/gradio_api/call/NAME, then its stream)."""
    r = client.post(f"/gradio_api/call/{endpoint}", json={"data": data})
    assert r.status_code == 200, r.text
    stream = client.get(f"/gradio_api/call/{endpoint}/{r.json()['event_id']}").text
    events = [line.split(": ", 1)[1] for line in stream.splitlines() if line.startswith("event: ")]
    datas = [line.split(": ", 1)[1] for line in stream.splitlines() if line.startswith("data: ")]
    return events[-1], datas[-1]


def _endpoint(client) -> str:
    named = client.get("/gradio_api/info").json()["named_endpoints"]
    return "answer" if "/answer" in named else next(iter(named)).lstrip("/")


@needs_demo
@pytest.mark.parametrize("target", ["/etc/passwd", "/proc/self/environ", "/dev/zero", "/nonexistent/x.png"])
def test_d1_d2_the_page_never_reads_a_server_file_a_client_names(demo_client, target, real_sample):
    """D1: a client-written file reference made the server read, cache and serve any file; D2:
    /dev/zero hung the server. Now every such request is refused alike, and the server keeps answering."""
    event, data = _call(demo_client, _endpoint(demo_client),
                        [{"path": target, "meta": {"_type": "gradio.FileData"}}, QUESTION])
    assert event == "error" and "uploaded" in data
    assert demo_client.get("/healthz").json() == {"status": "ok"}
    # and an image that was uploaded to the page is answered
    image = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    with open(image, "rb") as f:
        paths = demo_client.post("/gradio_api/upload", files={"files": (image.name, f, "image/png")}).json()
    event, data = _call(demo_client, _endpoint(demo_client),
                        [{"path": paths[0], "meta": {"_type": "gradio.FileData"}}, QUESTION])
    import runtime
    assert event == "complete" and json.loads(data)[0] == runtime.answer(str(image), QUESTION)


@needs_demo
def test_m7_the_page_has_one_named_endpoint_no_openapi_and_the_apis_wording(demo_client, real_sample):
    named = demo_client.get("/gradio_api/info").json()["named_endpoints"]
    assert list(named) == ["/answer"]
    assert demo_client.get("/openapi.json").status_code == 404
    r = demo_client.get("/no/such/page")
    assert r.status_code == 404 and "POST /answer" in r.json()["error"]
    image = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    with open(image, "rb") as f:
        paths = demo_client.post("/gradio_api/upload", files={"files": (image.name, f, "image/png")}).json()
    event, data = _call(demo_client, "answer", [{"path": paths[0], "meta": {"_type": "gradio.FileData"}}, QUESTION])
    picture = json.loads(data)[2]
    assert event == "complete" and picture.startswith('<img alt="routing path"')
    assert "data:image/png;base64," in picture and "/tmp" not in picture    # no server path, no server file


def _upload(client, name: str, data: bytes, kind: str = "image/png"):
    return client.post("/gradio_api/upload", files={"files": (name, data, kind)})


def _kept(root) -> list:
    return sorted(p for p in root.rglob("*") if p.is_file())


@needs_demo
def test_m5_the_page_keeps_only_images_names_no_server_path_and_bounds_what_it_keeps(demo_client, real_sample,
                                                                                   monkeypatch):
    """M5: /gradio_api/upload stored any file up to 20 MB, kept everything, and answered with absolute
    server paths. Now: images only (by content), a bound on what all uploads keep, no server path;
    the page (queue, preview) and gradio_client (/gradio_api/call) still work with what it gives."""
    from runtime.demo import uploads
    root = uploads.upload_folder()
    before = _kept(root)
    for name, data in (("notes.txt", b"hello, server"), ("evil.png", b"MZ\x90\x00" + bytes(5000)),
                       ("x.html", b"<script>alert(1)</script>")):
        r = _upload(demo_client, name, data)
        assert r.status_code == 415 and r.text.startswith("the page takes images only"), r.text
    assert _kept(root) == before                               # nothing of them stays
    image = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    r = _upload(demo_client, image.name, image.read_bytes())
    assert r.status_code == 200
    (token,) = r.json()
    assert token.startswith("upload/") and str(root) not in r.text and not token.startswith("/")
    preview = demo_client.get(f"/gradio_api/file={token}")
    assert preview.status_code == 200 and preview.content == image.read_bytes()
    assert demo_client.get("/gradio_api/file=upload/../../../etc/passwd").status_code == 404
    event, data = _call(demo_client, "answer", [{"path": token, "meta": {"_type": "gradio.FileData"}}, QUESTION])
    import runtime
    assert event == "complete" and json.loads(data)[0] == runtime.answer(str(image), QUESTION)
    event, data = _call(demo_client, "answer", [{"path": "upload/../../../etc/passwd",
                                                 "meta": {"_type": "gradio.FileData"}}, QUESTION])
    assert event == "error" and "uploaded" in data
    # what all uploads keep together is bounded: past it a new upload is refused and not kept
    kept = _kept(root)
    monkeypatch.setattr(uploads, "MAX_KEPT", 0)
    guard = _guard(demo_client.app)
    monkeypatch.setattr(guard, "max_kept", sum(p.stat().st_size for p in kept))
    r = _upload(demo_client, "another.png", image.read_bytes())
    assert r.status_code == 503 and "keeps at most" in r.text
    assert _kept(root) == kept


def _guard(app):
    """The UploadGuard instance in the app's middleware stack."""
    from runtime.demo.uploads import UploadGuard
    node = app.middleware_stack
    while node is not None and not isinstance(node, UploadGuard):
        node = getattr(node, "app", None)
    assert node is not None, "no UploadGuard around the page"
    return node


def test_d3_resume_never_replaces_another_run_in_its_out_folder(tiny_data, tmp_path):
    from conftest import tiny_train_config
    from qgmrn.settings import SettingsError
    from qgmrn.train import train
    quiet = dict(log=lambda *a, **k: None)
    a, b = tmp_path / "A", tmp_path / "B"
    train(tiny_train_config(tiny_data, a, steps=2), **quiet)
    train(tiny_train_config(tiny_data, b, steps=2, seed=5), **quiet)
    before = {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()}
    with pytest.raises(SettingsError, match="holds another run"):
        train(tiny_train_config(tiny_data, b, steps=4), resume=str(a / "ckpt.pt"), given={"out": str(b), "steps": 4},
              **quiet)
    assert {p.name: p.read_bytes() for p in b.iterdir() if p.is_file()} == before
    # into an empty folder it continues A's run; with --overwrite it may replace B's
    c = tmp_path / "C"
    train(tiny_train_config(tiny_data, c, steps=4), resume=str(a / "ckpt.pt"), given={"out": str(c), "steps": 4},
          **quiet)
    import torch
    assert torch.load(c / "ckpt.pt", weights_only=True)["step"] == 4
    train(tiny_train_config(tiny_data, b, steps=4), resume=str(a / "ckpt.pt"), given={"out": str(b), "steps": 4},
          overwrite=True, **quiet)
    assert torch.load(b / "ckpt.pt", weights_only=True)["train_config"]["seed"] == 0


def test_d4_a_run_folders_files_never_follow_planted_links(tiny_data, tmp_path):
    from conftest import tiny_train_config
    from qgmrn.train import train
    out, victims = tmp_path / "run", tmp_path / "victims"
    out.mkdir()
    victims.mkdir()
    for name in ("config.json.tmp", "eval.json.tmp", "metrics.jsonl.tmp", "metrics.jsonl", "curves.png.tmp.png"):
        (victims / name).write_text("precious")
        (out / name).symlink_to(victims / name)
    train(tiny_train_config(tiny_data, out, steps=2, eval_every=1), log=lambda *a, **k: None)
    train(tiny_train_config(tiny_data, out, steps=3), resume=str(out / "ckpt.pt"), given={"steps": 3},
          log=lambda *a, **k: None)                     # a resume trims metrics.jsonl through the helper too
    assert all((victims / n).read_text() == "precious" for n in os.listdir(victims))
    for name in ("metrics.jsonl", "config.json", "eval.json"):
        assert not (out / name).is_symlink() and (out / name).is_file()
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3


def test_d4_atomic_writes_replace_a_link_not_its_target(tmp_path):
    from qgmrn.files import write_atomic
    (tmp_path / "target").write_text("precious")
    (tmp_path / "eval.json").symlink_to(tmp_path / "target")
    write_atomic(tmp_path / "eval.json", "{}")
    assert (tmp_path / "target").read_text() == "precious" and not (tmp_path / "eval.json").is_symlink()
    assert (tmp_path / "eval.json").read_text() == "{}" and sorted(os.listdir(tmp_path)) == ["eval.json", "target"]


def test_m6_a_second_run_waits_for_the_built_in_dataset_and_reuses_it(tmp_path):
    import threading
    from qgmrn.files import FileLock
    from qgmrn.train.data import generate_builtin
    root = tmp_path / "clevr-generated"
    lock = FileLock(tmp_path / f".{root.name}.lock", "the built-in dataset")   # the first run, generating
    said: list = []
    t = threading.Thread(target=generate_builtin, args=(root, 12, said.append, 0.05))
    t.start()
    t.join(1.0)
    assert t.is_alive() and any("waiting" in m for m in said) and not root.exists()
    from qgmrn.data.generate import generate
    generate(root, 12, 2, 2, seed=0, workers=1, log=lambda *a: None)          # the first run finishes
    lock.release()
    t.join(30)
    assert not t.is_alive() and not any("generating the built-in" in m for m in said)   # reused, not made again


def test_m5_an_interrupted_pillow_dataset_continues_to_the_same_bytes(tmp_path):
    from qgmrn.data.generate import main as generate_main
    args = ["--images", "6", "--val-images", "2", "--questions", "2", "--workers", "1"]
    assert generate_main(["--out", str(tmp_path / "whole"), *args]) == 0
    assert generate_main(["--out", str(tmp_path / "cut"), *args]) == 0
    (tmp_path / "cut" / "questions" / "CLEVR_val_questions.json").unlink()     # killed before the end
    (tmp_path / "cut" / "images" / "val" / "CLEVR_val_000001.png").unlink()
    assert generate_main(["--out", str(tmp_path / "cut"), *args]) == 0
    files = sorted(p.relative_to(tmp_path / "whole") for p in (tmp_path / "whole").rglob("*") if p.is_file())
    assert files and all((tmp_path / "whole" / f).read_bytes() == (tmp_path / "cut" / f).read_bytes() for f in files)
    assert generate_main(["--out", str(tmp_path / "cut"), *args]) == 1             # complete: refused as before


def test_m6_temp_files_of_killed_saves_are_cleaned_on_resume(tiny_data, tmp_path):
    from conftest import tiny_train_config
    from qgmrn.train import train
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=2), log=lambda *a, **k: None)
    for name in ("ckpt.pt.k1l2.tmp", "ckpt.pt.zz.tmp", ".eval.json.ab12.tmp"):
        (out / name).write_bytes(b"half a checkpoint")                          # killed seconds ago
    train(tiny_train_config(tiny_data, out, steps=3), resume=str(out / "ckpt.pt"), given={"steps": 3},
          log=lambda *a, **k: None)
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_m1_a_lone_surrogate_in_the_question_is_the_clients_400(demo_client, real_sample):
    import base64
    image = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    body = '{"image": "%s", "question": "What color\\ud800 is it?"}' % base64.b64encode(image.read_bytes()).decode()
    r = demo_client.post("/answer", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400 and "surrogate" in r.json()["error"]
    assert demo_client.post("/answer", files={"image": ("a.png", image.read_bytes(), "image/png")},
                            data={"question": QUESTION}).status_code == 200


def test_m9_deeply_nested_reports_and_metadata_are_a_model_error(tmp_path):
    from runtime.errors import ModelError
    from runtime.metadata import parse_metadata
    from runtime.precision import read_report
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ModelError, match="nested too deeply"):
        parse_metadata(deep, "model.onnx")
    (tmp_path / "parity.json").write_text('{"a": ' + deep + "}")
    with pytest.raises(ModelError, match="nested too deeply"):
        read_report(tmp_path / "parity.json", "a parity report")


def _tamper(src, dst, change):
    import torch
    state = torch.load(src, weights_only=True)
    change(state)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)


@pytest.mark.parametrize("name, change, message", [
    ("heads-not-dict", lambda s: s.update(supervision=[1, 2]), "scene/where heads"),
    ("no-optimizer", lambda s: s.pop("optimizer"), "no optimizer state"),
    ("repeated-answers", lambda s: s.update(answers=[s["answers"][0]] * len(s["answers"])), "repeats"),
    ("short-vocab", lambda s: s.update(vocab=s["vocab"][:-3]), "vocabulary has"),
    ("negative-step", lambda s: s.update(step=-5), "not a count of steps"),
    ("optimizer-groups", lambda s: s["optimizer"].update(param_groups=s["optimizer"]["param_groups"] * 2),
     "optimizer state does not fit"),
])
def test_m7_m8_m8b_a_tampered_checkpoint_is_refused_at_resume_in_one_line(tiny_checkpoint, tmp_path, capsys,
                                                                          name, change, message):
    from qgmrn.train import main as train_main
    out = tmp_path / name
    _tamper(tiny_checkpoint, out / "ckpt.pt", change)
    before = (out / "ckpt.pt").read_bytes()
    assert train_main(["--resume", "--out", str(out), "--steps", "8"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1
    assert (out / "ckpt.pt").read_bytes() == before


def _qoi() -> bytes:
    return b"qoif" + (16).to_bytes(4, "big") * 2 + b"\x03\x00" + b"\xfe\xff\x00" * 40   # runs past its pixels


@pytest.mark.parametrize("data", [_qoi(), b"DDS |" + b"\x00" * 124 + b"\x00" * 64, b"icns" + b"\x00" * 60])
def test_m2_formats_pillow_half_supports_are_refused_by_content(data, demo_client):
    from qgmrn.preprocess import load_rgb
    from runtime.errors import ImageError
    with pytest.raises(ImageError, match="not an image format"):
        load_rgb(data)
    r = demo_client.post("/answer", files={"image": ("x.png", data, "image/png")}, data={"question": QUESTION})
    assert r.status_code == 400 and "not an image format" in r.json()["error"]


def test_m1_an_image_over_pillows_own_limit_gets_the_same_413(demo_client):
    import io
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (14000, 14000)).save(buf, "PNG")                 # 196 MP: past Pillow's bomb limit
    r = demo_client.post("/answer", files={"image": ("big.png", buf.getvalue(), "image/png")},
                         data={"question": QUESTION})
    assert r.status_code == 413 and "megapixels" in r.json()["error"] and "bomb" not in r.json()["error"]


@pytest.mark.parametrize("field, value", [("scene_weight", "1e300"), ("tau", "1e-300"), ("load_weight", "1e9")])
def test_m2b_settings_that_cannot_train_are_refused_before_any_file(tmp_path, capsys, field, value):
    from qgmrn.train import main as train_main
    out = tmp_path / "run"
    assert train_main(["--preset", "tiny", "--steps", "2", "--out", str(out), "--set", f"{field}={value}"]) == 2
    assert field in capsys.readouterr().err and not out.exists()


def _copy_data(src, dst, change_scenes=None, drop_programs=False):
    import shutil
    shutil.copytree(src, dst)
    if change_scenes:
        p = dst / "scenes" / "CLEVR_train_scenes.json"
        doc = json.loads(p.read_text())
        change_scenes(doc["scenes"])
        p.write_text(json.dumps(doc))
    if drop_programs:
        for split in ("train", "val"):
            p = dst / "questions" / f"CLEVR_{split}_questions.json"
            doc = json.loads(p.read_text())
            for q in doc["questions"]:
                q.pop("program", None)
            p.write_text(json.dumps(doc))
    return dst


def test_m3_scene_records_without_objects_are_named(tiny_data, tmp_path, capsys):
    from qgmrn.train import main as train_main
    data = _copy_data(tiny_data, tmp_path / "data", change_scenes=lambda s: s[2].update(objects=[]))
    rc = train_main(["--data-root", str(data), "--preset", "tiny", "--steps", "2", "--out", str(tmp_path / "r"),
                     "--set", "scene_weight=0.5", "--set", "batch_size=8"])
    err = capsys.readouterr().err
    assert rc == 2 and "list no objects" in err and "scene 2" in err and "lr" not in err


def test_m4_the_default_preset_on_data_without_programs_trains_without_the_where_loss(tiny_data, tmp_path):
    from conftest import tiny_train_config
    from qgmrn.train import train
    data = _copy_data(tiny_data, tmp_path / "data", drop_programs=True)
    said: list = []
    cfg = tiny_train_config(data, tmp_path / "r", preset="small", steps=1, scene_weight=None, where_weight=None)
    train(cfg, log=said.append)
    assert any("where loss is off" in str(m) for m in said) and (tmp_path / "r" / "ckpt.pt").exists()


@pytest.mark.parametrize("engine", ["local", pytest.param("ray", marks=pytest.mark.slow)])
def test_m3_clients_that_never_finish_their_headers_are_closed(monkeypatch, engine):
    """Both engines: on Ray, the header deadline lives in Ray's own proxy (runtime.api's proxy hook)."""
    import socket
    import time
    import serving
    if not serving.HAVE[engine]:
        pytest.skip(serving.WHY[engine])
    monkeypatch.setitem(serving.ENV, "QGMRN_HEADER_SECONDS", "2")
    url, proc = serving.start(engine, "--no-demo")
    try:
        port = int(url.rsplit(":", 1)[1])
        stalled = []
        for i in range(60):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"")   # half headers, or nothing
            s.settimeout(8)
            stalled.append(s)
        assert serving.request(url + "/healthz", timeout=5)[0] == 200
        t0 = time.time()
        closed = sum(s.recv(1) == b"" for s in stalled)                 # the server hangs up on each
        assert closed == len(stalled) and time.time() - t0 < 8
        assert serving.request(url + "/healthz", timeout=5)[0] == 200
    finally:
        serving.stop(proc)


def test_m4_bytes_buffered_across_requests_are_capped():
    """Uploads held open together cost memory each: past the total, the next chunk is a 503, and what
    the finished requests held is released."""
    import asyncio
    from runtime.api import BodyLimit

    async def app(scope, receive, send):                       # reads the whole body, then answers
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def upload(guard, release: asyncio.Event, statuses: list):
        chunks = [{"type": "http.request", "body": b"x" * 600, "more_body": True}]

        async def receive():
            if chunks:
                return chunks.pop()
            await release.wait()
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            if message["type"] == "http.response.start":
                statuses.append(message["status"])
        await guard({"type": "http", "method": "POST", "headers": []}, receive, send)

    async def main():
        guard, release, statuses = BodyLimit(app, limit=1000, seconds=5, total=1500), asyncio.Event(), []
        tasks = [asyncio.create_task(upload(guard, release, statuses)) for _ in range(3)]
        await asyncio.sleep(0.1)
        release.set()
        await asyncio.gather(*tasks)
        assert sorted(statuses) == [200, 200, 503] and guard.buffered == 0
    asyncio.run(main())


def test_m10_listeners_counts_the_sockets_sharing_a_port():
    import socket
    from runtime.serve import listeners
    if listeners("127.0.0.1", 1) is None:
        pytest.skip("the kernel does not list its sockets in /proc/net/tcp (not Linux)")
    first = socket.socket()
    first.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    first.bind(("127.0.0.1", 0))
    first.listen()
    port = first.getsockname()[1]
    try:
        assert listeners("127.0.0.1", port) == 1
        with socket.socket() as second:
            second.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            second.bind(("127.0.0.1", port))
            second.listen()
            assert listeners("127.0.0.1", port) == 2 and listeners("localhost", port) == 2
        assert listeners("127.0.0.1", port) == 1
    finally:
        first.close()


# A listener that takes the port with sharing in the seconds between the port check and Ray's proxy:
# bind() is wrapped so that the moment the check lets its socket go, the intruder binds.
INTRUDER = """
import socket, sys
import runtime.serve as s
real_bind, keep = s.bind, []
class Checked:
    def __init__(self, sock, host, port): self.sock, self.host, self.port = sock, host, port
    def close(self):
        self.sock.close()
        intruder = socket.socket()
        intruder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        intruder.bind((self.host, self.port)); intruder.listen(); keep.append(intruder)
s.bind = lambda host, port: Checked(real_bind(host, port), host, port)
sys.exit(s.main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_m10_a_ray_start_that_shares_its_port_with_another_listener_is_refused():
    import subprocess
    from serving import ENV, HAVE, WHY, free_port
    if not HAVE["ray"]:
        pytest.skip(WHY["ray"])
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", INTRUDER, "--engine", "ray", "--port", str(port), "--no-demo"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        out, errs = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:                    # it started serving beside the intruder
        proc.terminate()
        out, errs = proc.communicate(timeout=60)
        pytest.fail(f"the server started on a shared port: {out[-300:]}")
    err = [line for line in errs.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, errs[-2000:]
    assert err == [f"error: another program listens on 127.0.0.1:{port} beside Ray's proxy and would take some "
                   "of the requests; stop it or choose another --port"], errs[-2000:]
    assert "serving" not in out
