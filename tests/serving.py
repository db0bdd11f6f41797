"""Helpers for the serving tests: start `python -m runtime.serve` on a free loopback port, talk HTTP
to it (urllib, raw sockets for hostile clients) and see which processes it left behind."""
import importlib.util
import io
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
HAVE = {"local": all(importlib.util.find_spec(m) for m in ("fastapi", "uvicorn", "python_multipart")),
        "ray": all(importlib.util.find_spec(m) for m in ("fastapi", "ray", "python_multipart"))}
WHY = {"local": "the serve extra is not installed (pip install -e '.[serve]')",
       "ray": "Ray Serve is not installed (pip install -e '.[ray]')"}
ENV = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request(url, body=None, ctype=None, method=None, timeout=60):
    req = urllib.request.Request(url, data=body, method=method or ("POST" if body is not None else "GET"),
                                 headers={"content-type": ctype} if ctype else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except json.JSONDecodeError:
            return e.code, {"raw": raw.decode(errors="replace")}


def multipart(parts: list[tuple[bytes, bytes]], boundary: str | None = None) -> tuple[bytes, str]:
    boundary = boundary or uuid.uuid4().hex
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + head + b"\r\n\r\n" + value + b"\r\n" for head, value in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


def image_part(image: bytes, name: str = "image") -> tuple[bytes, bytes]:
    return (f'Content-Disposition: form-data; name="{name}"; filename="x.png"\r\nContent-Type: image/png'.encode(),
            image)


def field(name: str, value: str) -> tuple[bytes, bytes]:
    return f'Content-Disposition: form-data; name="{name}"'.encode(), value.encode()


def form(image: bytes, question: str, top_k=None) -> tuple[bytes, str]:
    parts = [image_part(image), field("question", question)]
    if top_k is not None:
        parts.append(field("top_k", str(top_k)))
    return multipart(parts)


def bomb_16bit(side: int = 8000) -> bytes:
    """A ~130 KB PNG of side x side 16-bit pixels: under the 64 MP limit, ~0.7 GB to decode."""
    import numpy as np
    b = io.BytesIO()
    Image.fromarray(np.zeros((side, side), np.uint16)).save(b, "PNG")
    return b.getvalue()


def start(engine: str, *args, port: int | None = None, wait: bool = True):
    """(url, process) of a server; waits until /healthz answers."""
    port = port or free_port()
    # Output to files, not pipes: a server that logs more than a pipe holds would block on a write.
    log = tempfile.NamedTemporaryFile("w+", prefix="qgmrn-serve-", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "runtime.serve", "--engine", engine, "--port", str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, text=True, env=ENV, start_new_session=True)
    proc.log = log.name
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while wait and time.time() < deadline:
        try:
            if request(url + "/healthz", timeout=5)[0] == 200:
                break
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            pass
        if proc.poll() is not None:
            raise AssertionError(f"the server exited: {output(proc)}")
        time.sleep(0.5)
    else:
        if wait:
            stop(proc)
            raise AssertionError("the server did not come up in 180 s")
    return url, proc


def output(proc) -> str:
    return Path(proc.log).read_text()


def descendants(pid: int) -> set[int]:
    """Every live process under `pid` (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def alive(pids: set[int]) -> set[int]:
    out = set()
    for p in pids:
        try:
            if Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                out.add(p)
        except OSError:
            pass
    return out


def _hex_address(text: str) -> str:
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    if len(raw) == 4:
        return f"{socket.inet_ntop(socket.AF_INET, raw[::-1])}:{int(port, 16)}"
    words = b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))      # /proc stores each 32-bit word swapped
    return f"[{socket.inet_ntop(socket.AF_INET6, words)}]:{int(port, 16)}"


def listening(pids: set[int]) -> list[str]:
    """The TCP addresses these processes listen on (from /proc: their socket inodes, /proc/net/tcp*)."""
    inodes = set()
    for p in pids:
        for fd in Path(f"/proc/{p}/fd").glob("*") if Path(f"/proc/{p}/fd").exists() else []:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:                      # 0A: LISTEN
                found.append(_hex_address(cols[1]))
    return found


def stop(proc, sig=None, timeout=90) -> int | None:
    import signal
    if proc.poll() is None:
        proc.send_signal(sig or signal.SIGINT)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode
