"""How a server starts and stops, whichever engine: a port in use is refused in one line, bad
settings are refused before anything starts, Ctrl-C during start-up stops it, SIGTERM answers the
request in flight before it stops, and nothing is left running or listening beyond loopback."""
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import runtime
from serving import ENV, HAVE, WHY, alive, descendants, form, free_port, listening, output, request, start, stop

pytestmark = pytest.mark.slow
ENGINES = [pytest.param(e, marks=pytest.mark.skipif(not HAVE[e], reason=WHY[e])) for e in ("local", "ray")]


def _run(*args, timeout=60):
    return subprocess.run([sys.executable, "-m", "runtime.serve", *args], capture_output=True, text=True, env=ENV,
                          timeout=timeout)


def _one_error_line(r, *words):
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and last.startswith("error:") and all(w in last for w in words), r.stderr
    assert "Traceback" not in r.stderr, r.stderr


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("reuse_port", [False, True])
def test_a_port_in_use_is_refused_in_one_line(engine, reuse_port):
    """Another server on the port, plain or sharing the port as Ray's proxy does: refused."""
    with socket.socket() as other:
        if reuse_port:
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        r = _run("--engine", engine, "--port", str(port), "--no-demo", timeout=120)
    _one_error_line(r, str(port), "another server")


@pytest.mark.parametrize("args, words", [
    (["--batch-wait-ms", "nan"], ["--batch-wait-ms"]),
    (["--batch-wait-ms", "inf"], ["--batch-wait-ms"]),
    (["--batch-wait-ms", "-1"], ["--batch-wait-ms"]),
    (["--max-batch", "0"], ["--max-batch"]),
    (["--port", "70000"], ["--port"]),
    (["--engine", "local", "--replicas", "2"], ["--engine ray"]),
])
def test_bad_settings_are_refused_before_anything_starts(args, words):
    r = _run(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr and all(w in r.stderr for w in words), r.stderr


@pytest.mark.skipif(not HAVE["ray"], reason=WHY["ray"])
def test_an_unreachable_ray_address_is_one_line_quickly():
    t = time.time()
    r = _run("--engine", "ray", "--address", f"127.0.0.1:{free_port()}", "--port", str(free_port()), timeout=60)
    assert time.time() - t < 30
    _one_error_line(r, "no Ray cluster answers")


@pytest.mark.parametrize("engine", ENGINES)
def test_ctrl_c_during_start_up_stops_it(engine):
    """Ray takes seconds to start: the signal lands there. The local engine may already be up by
    then (it starts in about a second): then it stops as cleanly."""
    url, proc = start(engine, "--no-demo", wait=False)
    time.sleep(1.5)                                     # loading the model, or starting Ray
    proc.send_signal(signal.SIGINT)
    assert proc.wait(120) == 0, output(proc)
    assert "stopped" in output(proc) and "Traceback" not in output(proc)
    if engine == "ray":
        assert "serving" not in output(proc)
    with pytest.raises(OSError):
        request(url + "/healthz", timeout=2)


def _slow_upload(url: str, image: bytes, question: str, started: threading.Event, result: list):
    """One request whose body arrives in two halves, 3 s apart: in flight when the signal comes."""
    body, ctype = form(image, question)
    host, port = url.rsplit("/", 1)[-1].split(":")
    with socket.create_connection((host, int(port)), timeout=60) as s:
        s.sendall(f"POST /answer HTTP/1.1\r\nHost: x\r\nContent-Type: {ctype}\r\n"
                  f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:len(body) // 2])
        started.set()
        time.sleep(3)
        s.sendall(body[len(body) // 2:])
        data = b""
        while chunk := s.recv(65536):
            data += chunk
            if b"\r\n\r\n" in data and data.endswith(b"}"):
                break
        result.append(data)


@pytest.mark.parametrize("engine", ENGINES)
def test_sigterm_answers_what_is_in_flight_then_stops_and_leaves_nothing_running(engine, real_sample):
    url, proc = start(engine, "--no-demo")
    family = descendants(proc.pid) | {proc.pid}
    path = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    started, result = threading.Event(), []
    client = threading.Thread(target=_slow_upload, args=(url, path.read_bytes(), "How many cubes are there?",
                                                         started, result))
    client.start()
    started.wait(30)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    client.join(90)
    assert proc.wait(120) == 0, output(proc)
    assert "stopped" in output(proc)
    assert result and result[0].startswith(b"HTTP/1.1 200"), result
    assert runtime.answer(str(path), "How many cubes are there?").encode() in result[0]
    time.sleep(2)
    assert not alive(family), f"left running: {alive(family)}"


@pytest.mark.skipif(not HAVE["ray"], reason=WHY["ray"])
def test_a_loopback_ray_server_keeps_rays_own_services_on_loopback():
    url, proc = start("ray", "--no-demo")
    try:
        addresses = listening(descendants(proc.pid) | {proc.pid})
        assert addresses, "found none of the server's listening sockets"
        exposed = [a for a in addresses if not a.startswith(("127.", "[::1]", "[::ffff:127."))]
        assert not exposed, f"listening beyond loopback: {exposed}"
    finally:
        assert stop(proc) == 0
