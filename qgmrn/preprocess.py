"""Question tokenization, vocabularies and image preprocessing: torch-free, shared by training and
the runtime, so what the model saw in training is exactly what it sees in an app."""
from __future__ import annotations

import io
import os
import re
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

NULL, UNK = "<NULL>", "<UNK>"
NULL_ID, UNK_ID = 0, 1
# ImageNet statistics: the usual choice for a network trained from raw pixels.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)

_TOKEN = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


class ImageError(ValueError):
    """An image that cannot be read or used."""


class QuestionError(ValueError):
    """A question that cannot be encoded."""


def tokenize(question: str) -> list[str]:
    """Lowercase; words and numbers are tokens, each punctuation mark is a token."""
    if not isinstance(question, str):
        raise QuestionError(f"question must be a str, got {type(question).__name__}")
    return _TOKEN.findall(question.lower())


@dataclass
class Vocab:
    """Question tokens <-> ids. Id 0 pads (NULL), id 1 stands for words never seen (UNK)."""

    tokens: list[str] = field(default_factory=lambda: [NULL, UNK])

    def __post_init__(self):
        if self.tokens[:2] != [NULL, UNK]:
            raise ValueError("a vocabulary starts with <NULL>, <UNK>")
        self._index = {t: i for i, t in enumerate(self.tokens)}

    @classmethod
    def build(cls, questions: Iterable[str], min_count: int = 1) -> "Vocab":
        counts = Counter(t for q in questions for t in tokenize(q))
        return cls([NULL, UNK] + sorted(t for t, c in counts.items() if c >= min_count))

    def extend(self, questions: Iterable[str]) -> list[str]:
        """Append unseen words at the end (existing ids stay put); returns the new words."""
        new = sorted({t for q in questions for t in tokenize(q)} - set(self._index))
        for t in new:
            self._index[t] = len(self.tokens)
            self.tokens.append(t)
        return new

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, question: str) -> tuple[list[int], list[str]]:
        """Token ids and the words that mapped to UNK."""
        words = tokenize(question)
        if not any(w[0].isalnum() for w in words):
            raise QuestionError("question is empty: it has no words")
        ids = [self._index.get(w, UNK_ID) for w in words]
        return ids, [w for w, i in zip(words, ids) if i == UNK_ID]


def encode_batch(vocab: Vocab, questions: list[str], max_len: int | None = None
                 ) -> tuple[np.ndarray, np.ndarray, list[list[str]]]:
    """Questions -> tokens (B, T) int64 padded with NULL, lengths (B,) int64, unknown words.

    Policy: a question longer than max_len tokens is refused (QuestionError), never truncated,
    since a cut question can have a different answer.
    """
    encoded = [vocab.encode(q) for q in questions]
    lengths = np.array([len(ids) for ids, _ in encoded], dtype=np.int64)
    if max_len is not None and lengths.max() > max_len:
        i = int(lengths.argmax())
        raise QuestionError(f"question {i} has {lengths[i]} tokens; this model takes at most {max_len}")
    tokens = np.zeros((len(questions), int(lengths.max())), dtype=np.int64)
    for row, (ids, _) in enumerate(encoded):
        tokens[row, :len(ids)] = ids
    return tokens, lengths, [unk for _, unk in encoded]


# -- images ---------------------------------------------------------------------------------
# Largest image decoded: 64 megapixels (a 50 MP phone photo fits; the model sees 64-224 px). A PNG of
# a few hundred KB can claim 13000 x 13000 pixels and take gigabytes to decode: it is refused from
# its header, before decoding.
MAX_PIXELS = 64_000_000
# The formats decoded, recognised by content (never by a file name): what cameras, browsers and
# renderers write. Pillow reads more (QOI, DDS, ICNS, ...) but half-supports some of them: a
# malformed file there fails with IndexError or NotImplementedError deep inside the plugin.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF", "PPM")
_PIL_LOAD = threading.Lock()


def load_rgb(image) -> Image.Image:
    """A path, bytes, PIL image or uint8 array (HxW, HxWx3, HxWx4) -> RGB PIL image, upright
    (EXIF orientation applied, as photo viewers show it)."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        if not os.path.exists(path):
            raise ImageError(f"image file not found: {path}")
        if not os.path.isfile(path):              # a FIFO or a device would block or never end
            raise ImageError(f"image {path} is not a regular file")
        return _decode(path, f"image {path}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ImageError("image bytes are empty")
        return _decode(io.BytesIO(image), "image bytes")
    if isinstance(image, Image.Image):
        try:
            _check_pixels(image, "PIL image")
            with _PIL_LOAD:                       # a lazily opened image decodes once, in one thread
                image.load()
            return _check_size(_to_rgb(ImageOps.exif_transpose(image), "PIL image"), "PIL image")
        except (ValueError, OSError, SyntaxError) as e:   # closed, truncated, a mode Pillow cannot convert
            if isinstance(e, ImageError):
                raise
            raise ImageError(f"cannot use the PIL image: {e}") from e
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ImageError(f"image array must be uint8, got {image.dtype}")
        if image.ndim == 3 and image.shape[2] == 1:
            image = image[:, :, 0]
        if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (3, 4)):
            raise ImageError(f"image array must be HxW, HxWx3 or HxWx4, got shape {image.shape}")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ImageError(f"image array has zero size: {image.shape}")
        return Image.fromarray(np.ascontiguousarray(image)).convert("RGB")
    raise ImageError(f"unsupported image type {type(image).__name__}: "
                     "give a path, bytes, a PIL image or a uint8 array")


def _decode(source, what: str) -> Image.Image:
    """Decode a file or buffer fully (a truncated PNG fails here, not later) and convert to RGB.
    The container is walked first (image_structure): work, not only pixels, is bounded."""
    from .image_structure import ImageWorkError, check_structure
    try:
        data = source.getvalue() if isinstance(source, io.BytesIO) else _read_file(source, what)
        check_structure(data, what)
    except ImageWorkError as e:
        raise ImageError(str(e)) from None
    source = io.BytesIO(data)
    try:
        with warnings.catch_warnings():           # the size is checked here, against MAX_PIXELS
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(source, formats=FORMATS)
        with im:
            _check_pixels(im, what)
            im.load()
            rgb = _to_rgb(ImageOps.exif_transpose(im), what)
    except Image.DecompressionBombError as e:             # Pillow's own limit, above ours: one message
        found = re.search(r"\((\d+) pixels\)", str(e))
        size = f" ({int(found.group(1)):,} pixels)" if found else ""
        raise ImageError(f"{what} is too large{size}: at most {MAX_PIXELS // 10**6} megapixels are decoded; "
                         "shrink it first") from e
    except UnidentifiedImageError as e:
        raise ImageError(f"cannot decode {what}: not an image format Pillow reads "
                         f"(accepted: {', '.join(FORMATS)})") from e
    except ImageError:
        raise
    except Exception as e:                                # any decoder failure is the image's fault
        raise ImageError(f"cannot decode {what}: {type(e).__name__}: {e}") from e
    return _check_size(rgb, what)


def _read_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageError(f"cannot read {what}: {e.strerror or e}") from None


def _check_pixels(im: Image.Image, what: str) -> None:
    if im.width * im.height > MAX_PIXELS:
        raise ImageError(f"{what} is {im.width} x {im.height} pixels, more than the {MAX_PIXELS // 10**6} "
                         "megapixels this runtime decodes; shrink it first")


def _to_rgb(im: Image.Image, what: str) -> Image.Image:
    """RGB with 8 bits per channel. Pillow's convert("RGB") clips 16-bit and 32-bit integer
    pixels to 255 (a 16-bit PNG turns white) and float pixels to [0, 255] (a float TIFF in [0, 1]
    turns black), so those modes are scaled here by what their values mean."""
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im)
        lo, hi = int(a.min()), int(a.max())
        if mode == "I" and (lo < 0 or hi > 65535):
            raise ImageError(f"{what}: 32-bit integer pixels outside 0..65535 (range {lo}..{hi}); "
                             "give an 8- or 16-bit image")
        # mode "I" from a 16-bit PNG or TIFF holds 0..65535; any 8-bit data fits that scale too
        # only if its maximum says so: values <= 255 are read as 8 bits.
        full = 65535 if mode.startswith("I;16") or hi > 255 else 255
        return Image.fromarray(_rows_to_u8(a, lambda rows: (rows.astype(np.uint32) * 510 + full) // (2 * full))
                               ).convert("RGB")
    if mode == "F":
        a = np.asarray(im)                        # float32: no float64 copy of a large image
        if not np.isfinite(a).all():
            raise ImageError(f"{what}: float pixels include NaN or infinity")
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0.0 and hi <= 1.0:
            scale = 255.0
        elif lo >= 0.0 and hi <= 255.0 and hi > 1.0:
            scale = 1.0
        else:
            raise ImageError(f"{what}: float pixels in {lo:g}..{hi:g}: expected 0..1 or 0..255")
        return Image.fromarray(_rows_to_u8(a, lambda rows: np.rint(rows.astype(np.float64) * scale))).convert("RGB")
    if mode in ("La", "RGBa"):                    # premultiplied alpha: Pillow converts it via LA/RGBA
        im = im.convert("LA" if mode == "La" else "RGBA")
    return im.convert("RGB")


def _rows_to_u8(a: np.ndarray, convert, rows: int = 256) -> np.ndarray:
    """uint8 pixels from a wide-format array, converted a band of rows at a time: a 64 MP 16-bit
    image needs its uint8 result and one band of temporaries, not full-size float64 copies."""
    out = np.empty(a.shape, np.uint8)
    for top in range(0, a.shape[0], rows):
        out[top:top + rows] = np.clip(convert(a[top:top + rows]), 0, 255)
    return out


def _check_size(im: Image.Image, what: str) -> Image.Image:
    if im.width == 0 or im.height == 0:
        raise ImageError(f"{what} has zero size")
    return im


def resize_uint8(im: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (size, size, 3) uint8, bilinear (antialiased when shrinking)."""
    return np.asarray(im.resize((size, size), Image.BILINEAR), dtype=np.uint8)


_MEAN = np.array(MEAN, dtype=np.float32).reshape(3, 1, 1) * 255.0
_INV_STD = 1.0 / (np.array(STD, dtype=np.float32).reshape(3, 1, 1) * 255.0)


# (x - mean) * inv_std for every uint8 value of each channel, computed in float32 exactly as the
# arithmetic on the image would be: a table look-up gives the same bits, without converting a
# strided (channels-last) view to float, which cost 1.6 ms of a 224 px image's 3.4 ms to prepare.
_LUT = (np.arange(256, dtype=np.float32)[None, :] - _MEAN.reshape(3, 1)) * _INV_STD.reshape(3, 1)


def normalize(u8: np.ndarray) -> np.ndarray:
    """(..., S, S, 3) uint8 -> (..., 3, S, S) float32, ImageNet-normalised (contiguous)."""
    u8 = np.asarray(u8)
    out = np.empty(u8.shape[:-3] + (3,) + u8.shape[-3:-1], dtype=np.float32)
    for c in range(3):
        np.take(_LUT[c], u8[..., c], out=out[..., c, :, :])
    return out


def preprocess_image(image, size: int) -> np.ndarray:
    """Any accepted image -> (3, size, size) float32: the model's input for one image."""
    return normalize(resize_uint8(load_rgb(image), size))
