"""Load test of python -m runtime.serve on loopback, both engines next to one process answering serially.

    python bench/serve_load.py [--model builtin] [--clients 8] [--requests 250] [--engines local ray]
        [--replicas 1] [--max-batch 16] [--batch-wait-ms 5] [--max-seconds 300] [--ceiling]
        [--out docs/bench/serve_load]

For each engine (and, for Ray, each replica count): start the server on a free loopback port, send
clients x requests POST /answer (multipart, real CLEVR images from ../shared/data, questions in
turn; each client keeps its connection open, as HTTP clients do), bounded in time; report
throughput, p50/p99 latency, errors, the mean batch size and how many answers equal the serial
runtime.answer for the same input. The serial row is this process calling runtime.answer on the
same requests, one after another, in the same run. Writes Markdown and JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL = REPO.parent / "shared" / "data" / "clevr-real-sample"
QUESTIONS = ["How many cubes are there?", "What color is the large sphere?", "Is there a metal cylinder?",
             "What shape is the small red thing?", "Are there more cubes than spheres?",
             "What material is the big cylinder?", "Is the number of spheres greater than the number of cubes?"]


def cpu_name() -> str:
    from qgmrn.cpu import cpu_info
    return cpu_info()[0] or platform.processor() or "unknown CPU"


def multipart(image: bytes, question: str) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [(b'Content-Disposition: form-data; name="image"; filename="x.png"\r\nContent-Type: image/png', image),
             (b'Content-Disposition: form-data; name="question"', question.encode())]
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + h + b"\r\n\r\n" + v + b"\r\n" for h, v in parts)
    return body + b"--" + boundary.encode() + b"--\r\n", f"multipart/form-data; boundary={boundary}"


class Client:
    """One HTTP/1.1 connection, kept open between requests and reopened when the server closes it."""

    def __init__(self, url: str):
        from urllib.parse import urlparse
        u = urlparse(url)
        self.host, self.port, self.conn = u.hostname, u.port, None

    def post(self, path: str, body: bytes, ctype: str) -> tuple[int, dict, float]:
        import http.client
        t = time.perf_counter()
        for attempt in (0, 1):
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
                self.conn.request("POST", path, body, {"content-type": ctype})
                r = self.conn.getresponse()
                data = r.read()
                return r.status, json.loads(data) if r.status == 200 else {}, time.perf_counter() - t
            except (http.client.HTTPException, ConnectionError, TimeoutError, OSError):
                self.conn = None                            # closed by the server: one retry on a new one
        return 0, {}, time.perf_counter() - t


def echo_server(port: int, replicas: int) -> int:
    """Ray Serve answering every POST with a constant after reading its body: no decoding, no
    model. Its throughput is the most any model served this way can reach on this machine."""
    import ray
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(num_replicas=replicas)
    class Echo:
        async def __call__(self, request: Request):
            await request.body()
            return {"answer": None, "batch_size": 1}
    ray.init(include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(Echo.bind(), name="echo", route_prefix="/")
    while True:
        time.sleep(1)


def start_server(a, engine: str, replicas: int, echo: bool = False) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = ([sys.executable, __file__, "--echo-port", str(port), "--replicas", str(replicas)] if echo else
           [sys.executable, "-m", "runtime.serve", "--engine", engine, "--model", a.model, "--port", str(port),
            "--max-batch", str(a.max_batch), "--batch-wait-ms", str(a.batch_wait_ms), "--no-demo"]
           + (["--replicas", str(replicas)] if engine == "ray" else []))
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except (urllib.error.URLError, ConnectionError, OSError):
            time.sleep(0.5)
    proc.kill()
    raise SystemExit("error: the server did not come up in 180 s")


def load(url: str, jobs: list, clients: int, max_seconds: float) -> dict:
    deadline = time.perf_counter() + max_seconds
    chunks = [jobs[i::clients] for i in range(clients)]

    def client(mine):
        out, http = [], Client(url)
        for k, (image, question, _) in mine:
            if time.perf_counter() > deadline:
                break
            status, body, seconds = http.post("/answer", *multipart(image, question))
            out.append((k, status, body.get("answer"), seconds, body.get("batch_size", 0)))
        return out
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = [r for rs in pool.map(client, chunks) for r in rs]
    wall = time.perf_counter() - t
    lat = np.array([r[3] for r in done]) * 1000
    ok = [r for r in done if r[1] == 200]
    return {"requests": len(done), "errors": len(done) - len(ok), "seconds": round(wall, 2),
            "answers_per_s": round(len(ok) / wall, 1), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "equal_to_serial": sum(r[2] == jobs[r[0]][1][2] for r in ok),
            "mean_batch": round(float(np.mean([r[4] for r in ok])), 2) if ok else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="builtin")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=250, help="per client")
    ap.add_argument("--engines", nargs="+", choices=["local", "ray"], default=["local", "ray"])
    ap.add_argument("--replicas", type=int, nargs="+", default=[1], help="Ray replica counts to load")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--max-seconds", type=float, default=300, help="per load run")
    ap.add_argument("--out", default=None, help="write OUT.md and OUT.json")
    ap.add_argument("--ceiling", action="store_true",
                    help="also load a Ray Serve app that answers a constant (no decoding, no model): the "
                         "engine's own limit on this machine")
    ap.add_argument("--echo-port", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.echo_port:
        return echo_server(a.echo_port, a.replicas[0])
    import runtime
    images = [p.read_bytes() for p in sorted((REAL / "images").rglob("*.png"))]
    n = a.clients * a.requests
    requests = [(images[i % len(images)], QUESTIONS[i % len(QUESTIONS)]) for i in range(n)]
    model = runtime.load(a.model)
    serial, lat = [], []
    t = time.perf_counter()
    for img, q in requests:                                          # the reference and the baseline
        s0 = time.perf_counter()
        serial.append(model.answer(img, q))
        lat.append(time.perf_counter() - s0)
    serial_s = time.perf_counter() - t
    jobs = [(k, (img, q, ans)) for k, ((img, q), ans) in enumerate(zip(requests, serial))]
    rows = [{"setup": "one process, runtime.answer serially", "requests": n, "errors": 0,
             "seconds": round(serial_s, 2), "answers_per_s": round(n / serial_s, 1),
             "p50_ms": round(float(np.percentile(lat, 50)) * 1000, 1),
             "p99_ms": round(float(np.percentile(lat, 99)) * 1000, 1), "equal_to_serial": n, "mean_batch": 1}]
    print(f"serial: {rows[0]['answers_per_s']} answers/s", flush=True)
    runs = ([("local", 1, False)] if "local" in a.engines else []) + \
        ([("ray", r, False) for r in a.replicas] + ([("ray", 1, True)] if a.ceiling else []) if "ray" in a.engines else [])
    for engine, replicas, echo in runs:
        proc, url = start_server(a, engine, replicas, echo)
        what = "constant answer, no model (the engine's ceiling)" if echo else f"{a.clients} clients"
        name = "local engine (uvicorn, in-process batching)" if engine == "local" else f"Ray engine, {replicas} replica(s)"
        try:
            load(url, jobs[:4 * a.clients], a.clients, 30)      # warm-up, not counted
            row = {"setup": f"{name}, {what}", **load(url, jobs, a.clients, a.max_seconds)}
            if echo:
                row["equal_to_serial"] = "-"
        finally:
            proc.terminate()
            proc.wait(60)
        row["vs_serial"] = round(row["answers_per_s"] / rows[0]["answers_per_s"], 2)
        row["p99_over_p50"] = round(row["p99_ms"] / row["p50_ms"], 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = (f"Loopback load test, {a.clients} clients x {a.requests} requests, model {a.model}, max batch "
            f"{a.max_batch}, wait {a.batch_wait_ms:g} ms; {os.cpu_count()} cores ({cpu_name()}); "
            "`python bench/serve_load.py`")
    lines = [head, "", "| setup | requests | errors | answers/s | vs serial | p50 ms | p99 ms | p99/p50 | equal to serial "
                       "| mean batch |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setup']} | {r['requests']} | {r['errors']} | {r['answers_per_s']} | {r.get('vs_serial', 1.0)} | "
                     f"{r['p50_ms']} | {r['p99_ms']} | {r.get('p99_over_p50', '-')} | {r['equal_to_serial']} | "
                     f"{r['mean_batch']} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out + ".md").write_text(text + "\n")
        Path(a.out + ".json").write_text(json.dumps({"rows": rows, "cpu": cpu_name()}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
