"""Serving, whichever engine serves (`--engine local`: uvicorn in-process; `--engine ray`: Ray Serve):
one suite, run against both. A real server on a free loopback port answers as runtime.answer
does, batches concurrent requests without changing answers, turns every client mistake into one
4xx message while it keeps serving, holds its limits against hostile clients, and stops cleanly."""
import base64
import json
import socket
import threading
import time
import textwrap
from concurrent.futures import ThreadPoolExecutor

import pytest

import runtime
from serving import (HAVE, WHY, bomb_16bit, field, form, image_part, multipart, request, start, stop)

pytestmark = pytest.mark.slow
ENGINES = [pytest.param(e, marks=pytest.mark.skipif(not HAVE[e], reason=WHY[e])) for e in ("local", "ray")]
QUESTIONS = ["How many cubes are there?", "What color is the large sphere?", "Is there a metal cylinder?",
             "What shape is the small red thing?", "Are there more cubes than spheres?"]


@pytest.fixture(scope="module", params=ENGINES)
def server(request):
    url, proc = start(request.param, "--max-batch", "8", "--batch-wait-ms", "20", "--no-demo")
    yield url, proc, request.param
    stop(proc)


def _images(real_sample):
    return sorted((real_sample / "images" / "val").glob("*.png"))[:4]


def _json(image: bytes, question: str, **extra) -> tuple[bytes, str]:
    return json.dumps({"image": base64.b64encode(image).decode(), "question": question, **extra}).encode(), \
        "application/json"


def test_answers_over_http_equal_runtime_answer(server, real_sample):
    url = server[0]
    for path in _images(real_sample)[:2]:
        for q in QUESTIONS[:3]:
            status, got = request(url + "/answer", *form(path.read_bytes(), q))
            assert status == 200, got
            want = runtime.predict(str(path), q).to_dict()
            assert got["answer"] == want["answer"]
            assert [t["answer"] for t in got["top_k"]] == [t["answer"] for t in want["top_k"]]
            assert got["routing"]["gates"] == want["routing"]["gates"]
    path = _images(real_sample)[0]
    status, got = request(url + "/answer", *_json(path.read_bytes(), QUESTIONS[1], top_k=2))
    assert status == 200 and len(got["top_k"]) == 2 and got["answer"] == runtime.answer(str(path), QUESTIONS[1])


@pytest.mark.parametrize("wrap", [
    lambda b: "\n".join(textwrap.wrap(b, 76)) + "\n",             # what `base64 FILE` writes
    lambda b: "data:image/png;base64," + b,                        # what a browser's FileReader gives
])
def test_base64_as_clients_send_it(server, real_sample, wrap):
    path = _images(real_sample)[0]
    body = json.dumps({"image": wrap(base64.b64encode(path.read_bytes()).decode()), "question": QUESTIONS[0]})
    status, got = request(server[0] + "/answer", body.encode(), "application/json")
    assert status == 200 and got["answer"] == runtime.answer(str(path), QUESTIONS[0])


def test_concurrent_requests_are_batched_and_answer_as_serial_calls(server, real_sample):
    url = server[0]
    jobs = [(p, q) for p in _images(real_sample) for q in QUESTIONS][:24]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda j: request(url + "/answer", *form(j[0].read_bytes(), j[1])), jobs))
    assert all(status == 200 for status, _ in results)
    assert [r["answer"] for _, r in results] == [runtime.answer(str(p), q) for p, q in jobs]
    assert max(r["batch_size"] for _, r in results) > 1            # requests really were batched
    status, stats = request(url + "/stats")
    assert status == 200 and stats["answered"] >= len(jobs) and stats["mean_batch"] > 1


def test_the_model_card_and_health(server):
    url = server[0]
    status, card = request(url + "/model")
    assert status == 200 and card["answers"] == runtime.load("builtin").answers and "/" not in card["model"]
    assert request(url + "/healthz") == (200, {"status": "ok"})
    assert request(url + "/healthz", method="HEAD") == (200, None)


def _wrong_boundary(img):
    body, _ = form(img, "How many?")
    return body, "multipart/form-data; boundary=not-the-one-used"


BAD = [
    (lambda img: (b"hello", "text/plain"), 415, "content type"),
    (lambda img: (b"{not json", "application/json"), 400, "not valid JSON"),
    (lambda img: (json.dumps({"question": "How many?"}).encode(), "application/json"), 400, "BASE64"),
    (lambda img: (json.dumps({"image": "%%%", "question": "How many?"}).encode(), "application/json"), 400, "base64"),
    (lambda img: (json.dumps({"image": "data:image/png,abc", "question": "How many?"}).encode(), "application/json"),
     400, "data URL"),
    (lambda img: (b"[" * 100_000 + b"]" * 100_000, "application/json"), 400, "nested too deeply"),
    (lambda img: form(b"not an image", "How many cubes are there?"), 400, "cannot decode"),
    (lambda img: form(img, "   "), 400, "non-empty question"),
    (lambda img: form(img, "is " * 400 + "it?"), 413, "characters"),
    (lambda img: form(img, "Is there " + "a red cube and " * 30 + "a ball?"), 400, "tokens"),
    (lambda img: form(img, "How many?", top_k=0), 400, "top_k"),
    (lambda img: form(img, "How many?", top_k="inf"), 400, "top_k"),
    (lambda img: form(img, "How many?", top_k="1e400"), 400, "top_k"),
    (lambda img: form(img, "How many?", top_k="9" * 5000), 400, "top_k"),
    (lambda img: _json(img, "How many?", top_k=1e300), 400, "top_k"),
    (lambda img: (_json(img, "How many?")[0][:-1] + b', "top_k": 1e400}', "application/json"), 400, "top_k"),
    (lambda img: (_json(img, "How many?")[0][:-1] + b', "top_k": Infinity}', "application/json"), 400, "JSON"),
    (lambda img: (_json(img, "How many?")[0][:-1] + b', "top_k": ' + b"9" * 5000 + b"}", "application/json"),
     400, "JSON"),
    (lambda img: (form(img, "How many?")[0], "multipart/form-data"), 400, "boundary"),
    (_wrong_boundary, 400, "multipart"),
    (lambda img: (b"\x00garbage\xff" * 100, "multipart/form-data; boundary=x"), 400, "multipart"),
    (lambda img: multipart([image_part(img), image_part(img), field("question", "How many?")]), 400, "files"),
    (lambda img: multipart([image_part(img), field("question", "How many?")] +
                           [field(f"f{i}", "x") for i in range(6)]), 400, "fields"),
    (lambda img: multipart([image_part(img), image_part(b"How many?", "question")]), 400, "files"),
    (lambda img: multipart([field("image", "abc"), field("question", "How many?")]), 400, "file field"),
]


@pytest.mark.parametrize("make, status, message", BAD)
def test_bad_requests_get_one_4xx_message_and_the_server_keeps_serving(server, real_sample, make, status, message):
    url = server[0]
    image = _images(real_sample)[0].read_bytes()
    got_status, got = request(url + "/answer", *make(image))
    assert got_status == status and message in got["error"], got
    assert request(url + "/answer", *form(image, QUESTIONS[0]))[0] == 200


def _raw(url: str) -> socket.socket:
    host, port = url.rsplit("/", 1)[-1].split(":")
    return socket.create_connection((host, int(port)), timeout=60)


def _response(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the bytes of the response (a 100 Continue counts as one: the server asked for
    the body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    time.sleep(0.2)
    sock.setblocking(False)
    try:
        data += sock.recv(65536)
    except (BlockingIOError, ConnectionError):
        pass
    return int(data.split(b" ", 2)[1]), data


def test_a_body_over_the_limit_is_refused_before_it_is_sent(server):
    """As curl does for large bodies: headers with Expect: 100-continue, the body only if asked."""
    with _raw(server[0]) as s:
        s.sendall(b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (21 * 2**20))
        status, data = _response(s)
    assert status == 413 and b"bytes" in data


def test_a_chunked_body_is_cut_off_at_the_limit(server):
    """60 MB sent chunked (no Content-Length): refused once past 20 MB, not read whole first."""
    import select
    sent, status = 0, None
    with _raw(server[0]) as s:
        s.sendall(b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (2**20, b"a" * 2**20)
        try:
            while sent < 60 * 2**20:
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(chunk)
                sent += 2**20
            status, _ = _response(s)
        except (BrokenPipeError, ConnectionResetError):
            status = status or 413
    assert status == 413
    assert sent < 40 * 2**20, f"the server read {sent >> 20} MB before refusing"


def test_stalled_uploads_time_out_and_health_answers_meanwhile(server, real_sample):
    """70 uploads that stop halfway (more than Ray's old 64 request slots): /healthz and /answer
    still answer at once, and each stalled upload gets a 408 when its body time is up."""
    url = server[0]
    stalled = []
    for _ in range(70):
        s = _raw(url)
        s.sendall(b"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"image\": \"")
        stalled.append(s)
    try:
        time.sleep(1)
        t = time.time()
        assert request(url + "/healthz", timeout=10)[0] == 200
        image = _images(real_sample)[0].read_bytes()
        assert request(url + "/answer", *form(image, QUESTIONS[0]), timeout=10)[0] == 200
        assert time.time() - t < 10
        stalled[0].settimeout(60)
        status, data = _response(stalled[0])
        assert status == 408 and b"did not arrive" in data
    finally:
        for s in stalled:
            s.close()


def test_health_answers_under_answer_load(server, real_sample):
    url = server[0]
    image = _images(real_sample)[0].read_bytes()
    done = threading.Event()

    def load():
        while not done.is_set():
            request(url + "/answer", *form(image, QUESTIONS[1]))
    threads = [threading.Thread(target=load) for _ in range(8)]
    for th in threads:
        th.start()
    try:
        time.sleep(1)
        waits = []
        for _ in range(5):
            t = time.time()
            assert request(url + "/healthz", timeout=10)[0] == 200
            waits.append(time.time() - t)
        assert max(waits) < 5, waits
    finally:
        done.set()
        for th in threads:
            th.join()


def test_large_images_decode_one_at_a_time(server):
    """Three 8000 x 8000 16-bit PNGs at once (131 KB each, ~0.7 GB each to decode): all answered,
    never two decoded at the same time."""
    url, bomb = server[0], bomb_16bit()
    with ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: request(url + "/answer", *form(bomb, QUESTIONS[0]), timeout=120), range(3)))
    assert [s for s, _ in results] == [200, 200, 200], results
    assert request(url + "/stats")[1]["large_decodes_max"] == 1


def test_unknown_paths_and_methods(server):
    url = server[0]
    status, got = request(url + "/nope")
    assert status == 404 and "POST /answer" in got["error"]
    for path, method in (("/answer", "GET"), ("/healthz", "POST"), ("/model", "DELETE")):
        status, got = request(url + path, method=method, body=b"" if method != "GET" else None)
        assert status == 405 and "POST /answer" in got["error"], (path, method, got)
