"""Decoding a request's image for an engine: nothing that parses an image runs on the event loop,
and an engine decodes at most DECODE_THREADS images at once, so a hostile upload costs its sender
a decoding thread for a bounded time (qgmrn.image_structure bounds the work of one decode), not
every other client their /healthz.

Large images (more than LARGE_IMAGE_PIXELS) also wait for one of LARGE_DECODES turns: a 131 KB PNG
can claim 8000 x 8000 16-bit pixels and cost ~0.7 GB to decode; three at once would triple that.
"""
from __future__ import annotations

import asyncio
import io
import os
from concurrent.futures import ThreadPoolExecutor

from .errors import ImageError

LARGE_IMAGE_PIXELS = 12_000_000     # 12 MP and less (every camera photo up to 12 MP, every CLEVR render)
LARGE_DECODES = 1
LARGE_DECODE_WAIT_S = 60.0          # a large image waiting longer than this for its turn is a 503
DECODE_THREADS = max(1, min(4, os.cpu_count() or 1))


class DecodeRefused(Exception):
    """An image the engine will not decode: `status` is the HTTP status, the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def image_pixels(image: bytes) -> int:
    """Width x height from the image's header (no pixel decoding); 0 when it has none (decoding
    then fails with its own message). Raises ImageError for a container whose structure alone is
    refused (qgmrn.image_structure), before Pillow walks it."""
    from PIL import Image

    from qgmrn.image_structure import ImageWorkError, check_structure
    try:
        check_structure(image, "the image")
    except ImageWorkError as e:
        raise ImageError(str(e)) from None
    try:
        with Image.open(io.BytesIO(image)) as im:
            return im.width * im.height
    except Exception:
        return 0


def _load(image: bytes):
    from qgmrn.preprocess import load_rgb
    try:
        return load_rgb(image)
    except ImageError as e:
        raise DecodeRefused(413 if "megapixels" in str(e) else 400, str(e)) from None


def _measure_or_load(image: bytes):
    """(decoded image, pixels) for an image up to LARGE_IMAGE_PIXELS, in one trip to a decoding
    thread; (None, pixels) for a larger one, which waits for its turn before it decodes."""
    try:
        pixels = image_pixels(image)
    except ImageError as e:
        raise DecodeRefused(400, str(e)) from None
    return (_load(image) if pixels <= LARGE_IMAGE_PIXELS else None), pixels


class Decoder:
    """An engine's decoding threads: decode(bytes) -> RGB PIL image, awaited off the event loop."""

    def __init__(self, threads: int = DECODE_THREADS):
        self.threads = threads
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="qgmrn-decode")
        self._large: asyncio.Semaphore | None = None
        self.large_now = self.large_max = 0

    async def _run(self, fn, image: bytes):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, image)

    async def decode(self, image: bytes):
        decoded, _ = await self._run(_measure_or_load, image)
        if decoded is not None:
            return decoded
        self._large = self._large or asyncio.Semaphore(LARGE_DECODES)
        try:
            await asyncio.wait_for(self._large.acquire(), LARGE_DECODE_WAIT_S)
        except asyncio.TimeoutError:
            raise DecodeRefused(503, "busy decoding other large images; retry later or send a smaller image") from None
        self.large_now += 1
        self.large_max = max(self.large_max, self.large_now)
        try:
            return await self._run(_load, image)
        finally:
            self.large_now -= 1
            self._large.release()

    def close(self) -> None:
        """Stop taking decodes; a decode in flight finishes on its own (each is bounded in work)."""
        self._pool.shutdown(wait=False, cancel_futures=True)
