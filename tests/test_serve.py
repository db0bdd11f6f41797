"""Serving on Ray Serve: a real server on a free loopback port answers as runtime.answer does,
batches concurrent requests without changing answers, turns bad requests into one 4xx message
while it keeps serving, and stops cleanly."""
import base64
import importlib.util
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
from PIL import Image

import runtime
from conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    importlib.util.find_spec("ray") is None or importlib.util.find_spec("python_multipart") is None,
    reason="Ray Serve not installed (pip install 'qgmrn[serve]')")]

QUESTIONS = ["How many cubes are there?", "What color is the large sphere?", "Is there a metal cylinder?",
             "What shape is the small red thing?", "Are there more cubes than spheres?"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _request(url, body=None, ctype=None, method=None):
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"content-type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _multipart(image: bytes, question: str, top_k=None) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [(b'Content-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png', image),
             (b'Content-Disposition: form-data; name="question"', question.encode())]
    if top_k is not None:
        parts.append((b'Content-Disposition: form-data; name="top_k"', str(top_k).encode()))
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + value + b"\r\n" for head, value in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


@pytest.fixture(scope="module")
def server():
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--port", str(port), "--max-batch", "8",
                             "--batch-wait-ms", "20"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            if _request(url + "/healthz")[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError, json.JSONDecodeError):
            pass
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("the server did not come up in 120 s")
    yield url, proc
    if proc.poll() is None:
        proc.kill()


def _images(real_sample):
    return sorted((real_sample / "images" / "val").glob("*.png"))[:4]


def test_answers_over_http_equal_runtime_answer(server, real_sample):
    url, _ = server
    for path in _images(real_sample)[:2]:
        for q in QUESTIONS[:3]:
            status, got = _request(url + "/answer", *_multipart(path.read_bytes(), q))
            assert status == 200, got
            assert got["answer"] == runtime.answer(str(path), q)
            want = runtime.predict(str(path), q).to_dict()
            assert [t["answer"] for t in got["top_k"]] == [t["answer"] for t in want["top_k"]]
            assert got["routing"]["gates"] == want["routing"]["gates"]
    image = base64.b64encode(_images(real_sample)[0].read_bytes()).decode()
    status, got = _request(url + "/answer", json.dumps({"image": image, "question": QUESTIONS[1], "top_k": 2}).encode(),
                           "application/json")
    assert status == 200 and len(got["top_k"]) == 2
    assert got["answer"] == runtime.answer(str(_images(real_sample)[0]), QUESTIONS[1])


def test_concurrent_requests_are_batched_and_answer_as_serial_calls(server, real_sample):
    url, _ = server
    jobs = [(p, q) for p in _images(real_sample) for q in QUESTIONS][:24]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda j: _request(url + "/answer", *_multipart(j[0].read_bytes(), j[1])), jobs))
    assert all(status == 200 for status, _ in results)
    assert [r["answer"] for _, r in results] == [runtime.answer(str(p), q) for p, q in jobs]
    assert max(r["batch_size"] for _, r in results) > 1            # requests really were batched


def test_the_model_card_and_health(server):
    url, _ = server
    status, card = _request(url + "/model")
    assert status == 200 and card["answers"] == runtime.load("builtin").answers and "/" not in card["model"]
    assert _request(url + "/healthz") == (200, {"status": "ok"})


def _bomb() -> bytes:
    b = io.BytesIO()
    Image.new("1", (9000, 9000)).save(b, "PNG")
    return b.getvalue()


@pytest.mark.parametrize("make, status, message", [
    (lambda img: (b"hello", "text/plain"), 415, "content type"),
    (lambda img: (b"{not json", "application/json"), 400, "not valid JSON"),
    (lambda img: (json.dumps({"question": "How many?"}).encode(), "application/json"), 400, "BASE64"),
    (lambda img: (json.dumps({"image": "%%%", "question": "How many?"}).encode(), "application/json"), 400, "base64"),
    (lambda img: _multipart(b"not an image", "How many cubes are there?"), 400, "cannot decode"),
    (lambda img: _multipart(_bomb(), "How many cubes are there?"), 413, "megapixels"),
    (lambda img: _multipart(img, "   "), 400, "non-empty question"),
    (lambda img: _multipart(img, "is " * 400 + "it?"), 413, "characters"),
    (lambda img: _multipart(img, "Is there " + "a red cube and " * 30 + "a ball?"), 400, "tokens"),
    (lambda img: _multipart(img, "How many?", top_k=0), 400, "top_k"),
])
def test_bad_requests_get_one_4xx_message_and_the_server_keeps_serving(server, real_sample, make, status, message):
    url, _ = server
    image = _images(real_sample)[0].read_bytes()
    got_status, got = _request(url + "/answer", *make(image))
    assert got_status == status and message in got["error"], got
    assert _request(url + "/answer", *_multipart(image, QUESTIONS[0]))[0] == 200


def test_a_body_over_the_limit_is_refused_before_it_is_sent(server):
    """As curl does for large bodies: headers with Expect: 100-continue, the body only if asked."""
    import http.client
    from urllib.parse import urlparse
    u = urlparse(server[0])
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    conn.putrequest("POST", "/answer")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(21 * 2**20))
    conn.putheader("Expect", "100-continue")
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "bytes" in json.loads(r.read())["error"]
    conn.close()


def test_unknown_paths_and_methods(server):
    url, _ = server
    assert _request(url + "/nope")[0] == 404
    assert _request(url + "/answer", method="GET")[0] == 405


def test_sigint_stops_the_server(server):
    url, proc = server
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert "stopped" in proc.stdout.read()


def test_a_bad_model_is_one_line_before_ray_starts(tmp_path):
    bad = tmp_path / "x.onnx"
    bad.write_bytes(b"nope")
    r = subprocess.run([sys.executable, "-m", "runtime.serve", "--model", str(bad)], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error:") and "x.onnx" in last and "Traceback" not in r.stderr
