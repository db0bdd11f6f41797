"""Images whose structure costs far more work than their pixels (trust round 5, S1 and S2): each is
refused from its bytes in one line, honest files of every kind still decode, and nothing that
parses an image runs on a server's event loop. The hostile files are made here, small enough for
a 2-core machine, just past each bound."""
import asyncio
import importlib.util
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from qgmrn import image_structure as limits
from qgmrn.preprocess import ImageError, load_rgb

HAVE_DEMO = all(importlib.util.find_spec(m) is not None for m in ("gradio", "fastapi", "httpx"))


def _jpeg(progressive=False, size=(64, 48), **kw) -> bytes:
    rgb = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "JPEG", progressive=progressive, quality=90, **kw)
    return buf.getvalue()


def _png(size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes = b"") -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def jpeg_with_comments(n=limits.MAX_JPEG_SEGMENTS + 1) -> bytes:
    """An 8x8 JPEG behind n empty comment segments (FF FE 00 02)."""
    data = _jpeg(size=(8, 8))
    return data[:2] + b"\xff\xfe\x00\x02" * n + data[2:]


def jpeg_with_repeated_scans(n=limits.MAX_JPEG_SCANS + 10) -> bytes:
    """A progressive JPEG whose last scan (SOS header + its entropy-coded data) repeats n times."""
    data = _jpeg(progressive=True)
    last = data.rindex(b"\xff\xda")
    return data[:last] + data[last:-2] * n + data[-2:]


def png_with_chunks(n=limits.MAX_PNG_ANCILLARY + 1, kind=b"teXt") -> bytes:
    """An 8x8 PNG with n empty chunks before IEND (valid CRCs: Pillow reads them all)."""
    data = _png()
    end = data.rindex(b"IEND") - 4
    return data[:end] + _chunk(kind) * n + data[end:]


def gif_with_comments(n=limits.MAX_GIF_BLOCKS + 1) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (8, 8)).save(buf, "GIF")
    data = buf.getvalue()
    at = data.index(b"\x2c")                         # the first image descriptor
    return data[:at] + (b"\x21\xfe" + b"\x01x" * n + b"\x00") + data[at:]


HOSTILE = {
    "jpeg comment segments": (jpeg_with_comments, "marker segments"),
    "progressive jpeg of repeated scans": (jpeg_with_repeated_scans, "scans"),
    "png metadata chunks": (png_with_chunks, "metadata chunks"),
    "png empty pixel chunks": (lambda: png_with_chunks(1100, b"IDAT"), "PNG chunks"),
    "gif comment blocks": (gif_with_comments, "GIF extension blocks"),
}


@pytest.mark.parametrize("name", HOSTILE)
def test_an_image_that_costs_more_work_than_its_pixels_is_refused_in_one_line(name, tmp_path):
    make, words = HOSTILE[name]
    data = make()
    with pytest.raises(ImageError, match=words):
        load_rgb(data)
    path = tmp_path / "x.img"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=words) as e:
        load_rgb(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("make", [
    lambda: _jpeg(), lambda: _jpeg(progressive=True), lambda: _jpeg(progressive=True, optimize=True),
    lambda: _jpeg(exif=Image.Exif().tobytes()), lambda: _png((300, 200)),
    lambda: jpeg_with_comments(limits.MAX_JPEG_SEGMENTS - 20), lambda: png_with_chunks(50),
    lambda: gif_with_comments(100),
], ids=["baseline", "progressive", "progressive-optimized", "exif", "png", "some-comments", "some-chunks", "gif"])
def test_honest_images_of_every_kind_still_decode(make):
    im = load_rgb(make())
    assert im.mode == "RGB" and im.width > 0


def test_the_real_clevr_renders_decode(real_sample):
    for path in sorted((real_sample / "images" / "val").glob("*.png"))[:5]:
        assert load_rgb(path).size == (480, 320)


def _record_parsing(monkeypatch) -> list:
    """Every Image.open and structure walk, with whether it ran on an event loop's thread."""
    seen = []

    def on_loop():
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    real_open, real_check = Image.open, limits.check_structure
    monkeypatch.setattr(Image, "open", lambda *a, **k: (seen.append(on_loop()), real_open(*a, **k))[1])
    monkeypatch.setattr(limits, "check_structure", lambda *a, **k: (seen.append(on_loop()), real_check(*a, **k))[1])
    return seen


def test_the_engine_parses_images_off_the_event_loop_and_refuses_hostile_ones(monkeypatch):
    pytest.importorskip("onnxruntime")
    from runtime.api import Answerer, BadRequest
    engine = Answerer("builtin")
    seen = _record_parsing(monkeypatch)
    assert asyncio.run(engine.decode(_png((40, 30)))).size == (40, 30)
    with pytest.raises(BadRequest) as e:
        asyncio.run(engine.decode(jpeg_with_repeated_scans()))
    assert e.value.status == 400 and "scans" in str(e.value)
    assert seen and not any(seen), "an image was parsed on the event loop"


@pytest.mark.skipif(not HAVE_DEMO, reason="the demo extra is not installed (pip install -e '.[demo]')")
def test_the_demo_upload_parses_off_the_event_loop_and_refuses_hostile_images(monkeypatch):
    from fastapi.testclient import TestClient
    from runtime.engines import LocalEngine, build_asgi
    with TestClient(build_asgi(LocalEngine("builtin"))) as client:
        seen = _record_parsing(monkeypatch)
        ok = client.post("/gradio_api/upload", files={"files": ("ok.png", _png((12, 12)), "image/png")})
        bad = client.post("/gradio_api/upload", files={"files": ("x.png", png_with_chunks(), "image/png")})
    assert ok.status_code == 200 and bad.status_code == 415
    assert seen and not any(seen), "an upload was parsed on the event loop"
