"""Work bounds for decoding an image, checked from its bytes before Pillow sees them. Torch-free.

MAX_PIXELS bounds what a decode allocates; it does not bound the work. Pillow walks a JPEG's
marker segments and a PNG's chunks one at a time in Python, so 19 MB of empty comment segments
or 1.6 M empty chunks in front of an 8 x 8 image cost seconds of a core to open; libjpeg decodes
every scan of a progressive JPEG over the whole image, so a 149 KB file that repeats one 26-byte
refinement scan 3,000 times costs 39 s. Here each container is walked with C-speed searches and a
bounded count of steps, and refused (ImageError) past limits that honest encoders never reach:
encoders write about 10 progressive scans (libjpeg-turbo's djpeg offers -maxscans for this) and
a handful of metadata segments; PNG writers split pixel data into chunks of 8 KB or more.
"""
from __future__ import annotations

import re
import struct

MAX_JPEG_SCANS = 64            # progressive JPEGs from libjpeg, mozjpeg and browsers: 6 to 12
MAX_JPEG_SEGMENTS = 1000       # marker segments outside the scans' entropy-coded data
MAX_PNG_ANCILLARY = 1000       # chunks other than IDAT / fdAT
PNG_BYTES_PER_CHUNK = 1024     # pixel-data chunks allowed: 1,000 + one per KiB of the file
MAX_GIF_BLOCKS = 10_000        # extension sub-blocks before the first frame (Pillow reads them in Python)


class ImageWorkError(ValueError):
    """An image whose structure would cost far more work to decode than its pixels need."""


# In a JPEG's entropy-coded data 0xFF is followed by 0x00 (a stuffed byte) or a restart marker
# (0xD0-0xD7); anything else, after optional 0xFF fill bytes, starts the next marker.
_JPEG_MARKER = re.compile(rb"\xff+([^\x00\xd0-\xd7\xff])")


def check_structure(data: bytes, what: str) -> None:
    """Raise ImageWorkError when the image's container exceeds the bounds above."""
    head = bytes(data[:8])
    if head.startswith(b"\xff\xd8"):
        _check_jpeg(data, what)
    elif head == b"\x89PNG\r\n\x1a\n":
        _check_png(data, what)
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        _check_gif(data, what)


def _check_jpeg(data: bytes, what: str) -> None:
    pos, segments, scans, n = 2, 0, 0, len(data)
    while pos + 4 <= n:
        found = _JPEG_MARKER.match(data, pos) if data[pos] == 0xFF else None
        if found is None:                     # not at a marker: let the decoder say what is wrong
            return
        marker, pos = found.group(1)[0], found.end()
        if marker == 0xD9:                    # end of image
            return
        if marker in (0x01,) or 0xD0 <= marker <= 0xD7:
            continue                          # markers without a length
        if pos + 2 > n:
            return
        segments += 1
        if segments > MAX_JPEG_SEGMENTS:
            raise ImageWorkError(f"{what} has more than {MAX_JPEG_SEGMENTS:,} JPEG marker segments (honest "
                                 "files have a few dozen); it is refused unread")
        pos += struct.unpack_from(">H", data, pos)[0]
        if marker == 0xDA:                    # start of scan: skip its entropy-coded data
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise ImageWorkError(f"{what} is a progressive JPEG of more than {MAX_JPEG_SCANS} scans (encoders "
                                     "write about 10); decoding it would take minutes, so it is refused")
            nxt = _JPEG_MARKER.search(data, pos)
            if nxt is None:
                return
            pos = nxt.start()


def _check_png(data: bytes, what: str) -> None:
    pos, n, ancillary, pixel_chunks = 8, len(data), 0, 0
    allowed = 1000 + n // PNG_BYTES_PER_CHUNK
    while pos + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        if kind == b"IEND":
            return
        if kind in (b"IDAT", b"fdAT"):
            pixel_chunks += 1
            if pixel_chunks > allowed:
                raise ImageWorkError(f"{what} splits its pixels into more than {allowed:,} PNG chunks for "
                                     f"{n:,} bytes; it is refused unread")
        else:
            ancillary += 1
            if ancillary > MAX_PNG_ANCILLARY:
                raise ImageWorkError(f"{what} has more than {MAX_PNG_ANCILLARY:,} PNG metadata chunks (honest "
                                     "files have a few); it is refused unread")
        pos += 12 + length


def _check_gif(data: bytes, what: str) -> None:
    n = len(data)
    if n < 13:
        return
    pos = 13 + ((3 << ((data[10] & 7) + 1)) if data[10] & 0x80 else 0)       # + global colour table
    blocks = 0
    while pos + 1 < n:
        kind = data[pos]
        if kind != 0x21:                      # the first image descriptor, the trailer, or damage
            return
        pos += 2                              # extension: introducer, label, then sub-blocks ended by 0
        while pos < n:
            blocks += 1
            if blocks > MAX_GIF_BLOCKS:
                raise ImageWorkError(f"{what} has more than {MAX_GIF_BLOCKS:,} GIF extension blocks before its "
                                     "first frame (honest files have a few); it is refused unread")
            size = data[pos]
            pos += 1 + size
            if size == 0:
                break
