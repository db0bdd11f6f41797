"""Answers over HTTP: one app (runtime.api), served in this process or on Ray Serve.

    pip install -e '.[serve]'                    # add [demo] for the browser page at /
    python -m runtime.serve [--engine local|ray] [--model PATH] [--host 127.0.0.1] [--port 8000]
                            [--max-batch 16] [--batch-wait-ms 5] [--replicas N] [--address HOST:PORT]
    serve run runtime.serve:build_app model=PATH replicas=2     # Ray's own CLI and config files

--engine local (the default): uvicorn in this process; concurrent requests share batches in its
event loop. One machine, a few cores: this is the fast path. --engine ray: replicas of the same app
on Ray Serve (`--replicas`, a cluster with `--address`), each batching with @serve.batch.

Endpoints (runtime.api): POST /answer, GET|HEAD /healthz, GET /model, GET /stats, and the demo
page at / when the demo extra is installed. Binds to 127.0.0.1 unless --host says otherwise; Ray's
own services stay on loopback too when it starts them for a loopback server. SIGINT or SIGTERM:
stop taking connections, answer what is in flight, stop ("stopped", exit 0).
"""
from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import math
import os
import socket
import sys
import time
from pathlib import Path

from .errors import ModelError

ENGINES = ("local", "ray")
MAX_BATCH = 256
MAX_WAIT_MS = 1000.0
PROXY_HOOK = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
# Ray Serve's controller kills an HTTP proxy that has not answered its ready check within 5 s, and the
# start then dies with a traceback; on a busy two-core machine the proxy takes longer than that to import.
PROXY_READY = "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S"
PROXY_READY_SECONDS = "30"
DRAIN_SECONDS = 30                  # in-flight requests get this long to finish after SIGTERM


def _import_ray():
    try:
        import ray
        from ray import serve
    except ImportError as e:
        raise SystemExit("error: --engine ray needs Ray Serve: pip install -e '.[ray]'") from e
    return ray, serve


def build_app(args: dict, backend=None):
    """`serve run runtime.serve:build_app model=PATH replicas=2 max_batch=16 batch_wait_ms=5 demo=0`;
    backend: the name of an application holding the model replicas (serve_ray deploys it first)."""
    from .engines import ray_app, ray_model_app
    replicas, max_batch = int(args.get("replicas", 1)), int(args.get("max_batch", 16))
    wait = float(args.get("batch_wait_ms", 5.0))
    if replicas < 1 or not 1 <= max_batch <= MAX_BATCH or not (math.isfinite(wait) and 0 <= wait <= MAX_WAIT_MS):
        raise ValueError(f"replicas >= 1, max_batch in 1..{MAX_BATCH}, batch_wait_ms in 0..{MAX_WAIT_MS:g}")
    demo = str(args.get("demo", True)).lower() not in ("0", "false", "no")
    # the batch settings are the decorator's (ray_model_app builds the class with them)
    if backend == "model":
        return ray_model_app(args.get("model", "builtin"), replicas, max_batch, wait)
    return ray_app(args.get("model", "builtin"), demo, replicas, max_batch, wait, backend=backend)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, refused (one line) when another server has the port: Ray's
    proxy binds with port sharing, so without this check a second server would start anyway."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise SystemExit(f"error: --host {host}: {e.strerror}") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)     # TIME_WAIT only; never SO_REUSEPORT
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise SystemExit(f"error: cannot listen on {host}:{port}: {e.strerror} (is another server on it? "
                         "choose another --port)") from None
    sock.set_inheritable(True)
    return sock


def listeners(host: str, port: int) -> int | None:
    """How many sockets listen on host:port (or on the wildcard address at that port), from
    /proc/net/tcp and tcp6; None where the kernel does not say (not Linux)."""
    try:
        wanted = {ipaddress.ip_address(info[4][0]) for info in
                  socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
    except (socket.gaierror, ValueError):
        return None
    count, seen = 0, False
    for table, size in (("/proc/net/tcp", 4), ("/proc/net/tcp6", 16)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        seen = True
        for line in lines:
            fields = line.split()
            if len(fields) < 4 or fields[3] != "0A":                     # 0A: LISTEN
                continue
            address, _, hex_port = fields[1].partition(":")
            if int(hex_port, 16) != port:
                continue
            raw = bytes.fromhex(address)                                  # 32-bit words, host order
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, size, 4)) if sys.byteorder == "little" else raw
            ip = ipaddress.ip_address(raw)
            if getattr(ip, "ipv4_mapped", None):
                ip = ip.ipv4_mapped
            if ip in wanted or ip.is_unspecified:
                count += 1
    return count if seen else None


LISTENER_CHECK_S = 1.0              # how often the Ray engine looks for a listener sharing its port


def check_sole_listener(host: str, port: int, when: str = "") -> None:
    """Ray's proxy binds with port sharing: a program that binds the port with sharing too (between
    our check and the proxy's start, or later) would take some of the requests. Refuse to start, or
    stop serving, with one line."""
    n = listeners(host, port)
    if n is not None and n > 1:
        raise SystemExit(f"error: another program {when + ' and ' if when else ''}listens on {host}:{port} beside "
                         "Ray's proxy and would take some of the requests; "
                         + ("stopped serving" if when else "stop it or choose another --port"))


def check_address(address: str, seconds: float = 5.0) -> None:
    """A Ray cluster address must answer a TCP connect within `seconds`: ray.init would otherwise
    retry for minutes with nothing but warnings."""
    if address in ("auto", "local"):
        return
    hostport = address.split("://", 1)[-1]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise SystemExit(f"error: --address {address}: give HOST:PORT or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=seconds).close()
    except OSError as e:
        raise SystemExit(f"error: no Ray cluster answers at {address} ({e.strerror or e}); start one with "
                         "`ray start --head` or leave out --address") from None


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="python -m runtime.serve", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", choices=ENGINES, default="local")
    ap.add_argument("--model", default="builtin", help="a bundle, an .onnx, or 'builtin' (default)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--batch-wait-ms", type=float, default=5.0)
    ap.add_argument("--replicas", type=int, default=1, help="--engine ray: replicas of the app")
    ap.add_argument("--address", help="--engine ray: a Ray cluster to join (default: start one here)")
    ap.add_argument("--no-demo", action="store_true", help="serve the API only, no page at /")
    a = ap.parse_args(argv)
    if not 0 < a.port < 65536:
        ap.error(f"--port must be in 1..65535, got {a.port}")
    if not 1 <= a.max_batch <= MAX_BATCH:
        ap.error(f"--max-batch must be in 1..{MAX_BATCH}, got {a.max_batch}")
    if not (math.isfinite(a.batch_wait_ms) and 0 <= a.batch_wait_ms <= MAX_WAIT_MS):
        ap.error(f"--batch-wait-ms must be a number of milliseconds in 0..{MAX_WAIT_MS:g}, got {a.batch_wait_ms:g}")
    if a.replicas < 1:
        ap.error(f"--replicas must be at least 1, got {a.replicas}")
    if a.engine == "local" and (a.replicas != 1 or a.address):
        ap.error("--replicas and --address are for --engine ray")
    return a


class Stop:
    """SIGINT/SIGTERM from the first line of main: a Ctrl-C during start-up stops the start-up."""

    def __init__(self):
        self.signals: list[int] = []
        self.install()

    def install(self) -> None:
        import signal
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, lambda signum, frame: self.signals.append(signum))

    def __bool__(self) -> bool:
        return bool(self.signals)


def serve_local(a, model, stop: Stop) -> None:
    import uvicorn
    from .engines import LocalEngine, build_asgi
    engine = LocalEngine(model, a.max_batch, a.batch_wait_ms)
    sock = bind(a.host, a.port)
    app = build_asgi(engine, demo=not a.no_demo)
    from .protocol import MAX_CONNECTIONS, HeaderDeadline
    # headers must arrive within HEADER_SECONDS (a stalled client is closed), at most MAX_CONNECTIONS
    # at once (503 past it), so stalled clients cannot use up the process's file descriptors
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=DRAIN_SECONDS,
                            timeout_keep_alive=5, lifespan="on", http=HeaderDeadline,
                            limit_concurrency=MAX_CONNECTIONS)
    server = uvicorn.Server(config)
    if stop:
        return
    print(f"serving {a.model} on http://{a.host}:{a.port} (local engine, batches of up to {a.max_batch}, "
          f"{a.batch_wait_ms:g} ms wait); Ctrl-C stops", flush=True)
    try:
        server.run(sockets=[sock])       # uvicorn's own handlers drain on SIGINT/SIGTERM, then ours run
    finally:
        engine.close()
        sock.close()


def start_ray_on_loopback(ray) -> None:
    """qgmrn.ray_loopback's one-machine Ray on 127.0.0.1, with the replicas' gRPC servers on
    loopback too (engines.py reads LOOPBACK_ENV in each replica)."""
    from qgmrn.ray_loopback import start_ray_on_loopback as start
    from .engines import LOOPBACK_ENV
    os.environ[LOOPBACK_ENV] = "1"
    start(ray)


def serve_ray(a, model, stop: Stop) -> None:
    from .engines import MODEL_APP
    if a.address:
        check_address(a.address)
    bind(a.host, a.port).close()                # a port in use: one line, before Ray starts
    ray, serve = _import_ray()
    # Ray's HTTP proxy reads whole bodies before a replica sees them: our body limits go into the
    # proxy too, through Ray's hook for proxy middlewares (an environment variable its actors inherit).
    hook = {PROXY_HOOK: "runtime.api:proxy_middlewares",
            PROXY_READY: os.environ.get(PROXY_READY, PROXY_READY_SECONDS)}     # a user's own value wins
    os.environ.update(hook)
    if is_loopback(a.host) and not a.address:
        start_ray_on_loopback(ray)
    else:
        ray.init(address=a.address, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
                 runtime_env={"env_vars": hook})
    stop.install()                              # Ray sets handlers of its own
    try:
        if stop:
            return
        try:
            serve.start(http_options={"host": a.host, "port": a.port}, proxy_location="HeadOnly")
            args = {"model": a.model, "replicas": a.replicas, "max_batch": a.max_batch,
                    "batch_wait_ms": a.batch_wait_ms, "demo": not a.no_demo}
            # two applications, so that a shutdown drains the ingress while the model replicas still answer
            serve.run(build_app(args, "model"), name=MODEL_APP, route_prefix=None)
            serve.run(build_app(args, MODEL_APP), name="qgmrn", route_prefix="/")
        except (ray.exceptions.RayError, TimeoutError) as e:
            why = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SystemExit(f"error: Ray Serve did not start on {a.host}:{a.port}: {why}") from None
        stop.install()
        check_sole_listener(a.host, a.port)     # the proxy now listens: it must be alone on the port
        if not stop:
            print(f"serving {a.model} on http://{a.host}:{a.port} (Ray engine, {a.replicas} replica(s), batches of "
                  f"up to {a.max_batch}, {a.batch_wait_ms:g} ms wait); Ctrl-C stops", flush=True)
        checked = time.monotonic()
        while not stop:
            time.sleep(0.2)
            if time.monotonic() - checked >= LISTENER_CHECK_S:    # a listener that joins later
                checked = time.monotonic()
                check_sole_listener(a.host, a.port, "joined")
        serve.delete("qgmrn")                   # the ingress answers what it holds, then the model goes
        serve.delete(MODEL_APP)
    finally:
        serve.shutdown()
        ray.shutdown()


def main(argv=None) -> int:
    stop = Stop()
    a = parse_args(argv)
    import runtime
    try:
        if importlib.util.find_spec("uvicorn") is not None:
            from .protocol import header_seconds
            header_seconds()                        # a bad QGMRN_HEADER_SECONDS: one line, before any server
        model = runtime.load(a.model)           # a bad --model fails here, in one line, before any server
    except (ModelError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        (serve_local if a.engine == "local" else serve_ray)(a, model, stop)
    except SystemExit as e:
        if isinstance(e.code, str):
            print(e.code, file=sys.stderr)
            return 2
        raise
    print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
