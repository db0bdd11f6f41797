"""The two engines behind runtime.api's app: how concurrent requests share the model's batches.

LocalEngine: in this process, on the event loop of the server that runs the app (uvicorn). The
first request of a batch waits at most `batch_wait_ms` for others, up to `max_batch`; the model
runs on one worker thread while the loop keeps reading, decoding and queueing, so under load
the next batch is already waiting when the model is done.

ray_app(): the same Answerer as a Ray Serve application: one ingress replica (the app and the
page, `@serve.ingress`) in front of model replicas that batch (`@serve.batch`) across a cluster.
"""
from __future__ import annotations

import asyncio
import os
from concurrent.futures import ThreadPoolExecutor

from .api import Answerer, make_app


def build_asgi(engine: Answerer, demo: bool = True):
    """The API over `engine`, and the browser page at / when asked for and Gradio is installed."""
    app = make_app(engine)
    if demo:
        from .demo import mount_demo
        mount_demo(app, engine.model)
    return app


class LocalEngine(Answerer):
    def __init__(self, model="builtin", max_batch: int = 16, batch_wait_ms: float = 5.0):
        super().__init__(model)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000.0
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None
        self._runner = ThreadPoolExecutor(1, thread_name_prefix="qgmrn-batch")

    async def submit(self, item: tuple) -> dict:
        if self._queue is None:
            self._queue = asyncio.Queue()
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._batches())
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((item, future))
        return await future

    async def _collect(self) -> list:
        """One batch: the first queued request, then whatever arrives within the wait, up to max."""
        assert self._queue is not None
        loop = asyncio.get_running_loop()
        batch = [await self._queue.get()]
        deadline = loop.time() + self.batch_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            live = [(item, f) for item, f in batch if not f.done()]        # a cancelled waiter needs no answer
            if not live:
                continue
            try:
                results = await loop.run_in_executor(self._runner, self.run_batch, [item for item, _ in live])
            except Exception as e:                      # the model failed: every request of the batch says so
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), result in zip(live, results):
                if not f.done():
                    f.set_result(result)

    def close(self) -> None:
        self._runner.shutdown(wait=True)


LOOPBACK_ENV = "QGMRN_RAY_LOOPBACK"        # set by runtime.serve when it starts Ray for a loopback server


def _replica_grpc_on_loopback() -> None:
    """Ray Serve binds each replica's gRPC server (how its proxy reaches it) to [::]:0, every
    interface, whatever the node's IP; on a one-machine, loopback-only server bind it to
    127.0.0.1 instead (tests/test_serve_lifecycle.py checks every listening socket)."""
    from ray.serve._private import replica
    add = replica.add_port_to_grpc_server
    if getattr(add, "loopback", False):
        return

    def add_on_loopback(server, address: str):
        return add(server, address.replace("[::]:", "127.0.0.1:", 1))
    add_on_loopback.loopback = True                 # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_on_loopback


MODEL_APP = "qgmrn-model"       # runtime.serve deploys the model replicas as their own application
MODEL_DEPLOYMENT = "qgmrn-model"    # the model replicas' deployment, in that application or in ray_app's


def ray_app(model: str = "builtin", demo: bool = True, replicas: int = 1, max_batch: int = 16,
            batch_wait_ms: float = 5.0, max_ongoing: int = 256, backend=None):
    """The Ray Serve application (built lazily: Ray is an optional extra): one ingress replica that
    serves the app and the browser page, reads, checks and decodes requests, in front of model
    replicas that batch (`@serve.batch`) and answer. The page lives in one place: Gradio keeps its
    queue and event ids in one process, and Ray's proxy would send a call's POST and the GET of its
    event stream to different replicas (trust round 5, M3: 5 of 20 calls completed with 2 replicas).
    backend: None composes the model replicas into this application (`serve run`); the name of
    an application (ray_model_app, deployed first) uses those, so that a shutdown can drain the
    ingress before the model replicas go. `max_ongoing` requests per model replica."""
    from ray import serve

    @serve.ingress()
    class QGMRN(Answerer):
        def __init__(self, model: str = "builtin", demo: bool = True, backend=None):
            if os.environ.get(LOOPBACK_ENV) == "1":
                _replica_grpc_on_loopback()
            Answerer.__init__(self, model)
            self.demo = demo
            self.backend = serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=backend) \
                if isinstance(backend, str) else backend

        async def submit(self, item: tuple) -> dict:
            out = await self.backend.run.remote(item)
            self.counts["answered"] += 1
            self.counts["batches"] += 1 / out["batch_size"]      # each batch's answers add up to one
            return out

        def stats(self) -> dict:
            return {**Answerer.stats(self), "batches": round(self.counts["batches"])}

        def __serve_build_asgi_app__(self):
            return build_asgi(self, self.demo)

    if backend is None:
        backend = ray_model_app(model, replicas, max_batch, batch_wait_ms, max_ongoing)
    ingress = serve.deployment(QGMRN, name="qgmrn", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=max_ongoing * replicas)
    return ingress.bind(model, demo, backend)


def ray_model_app(model: str = "builtin", replicas: int = 1, max_batch: int = 16, batch_wait_ms: float = 5.0,
                  max_ongoing: int = 256):
    """The model replicas: each batches the checked, decoded requests it is handed and answers."""
    from ray import serve

    class QGMRNModel:
        def __init__(self, model: str = "builtin"):
            if os.environ.get(LOOPBACK_ENV) == "1":
                _replica_grpc_on_loopback()
            self.answerer = Answerer(model)

        @serve.batch(max_batch_size=max_batch, batch_wait_timeout_s=batch_wait_ms / 1000.0)
        async def run(self, items: list) -> list[dict]:
            return await asyncio.to_thread(self.answerer.run_batch, items)

    return serve.deployment(QGMRNModel, name=MODEL_DEPLOYMENT, num_replicas=replicas, ray_actor_options={"num_cpus": 0},
                            max_ongoing_requests=max_ongoing).bind(model)
