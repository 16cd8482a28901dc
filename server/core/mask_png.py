"""The full-size mask's palette PNG, written straight from the model-size label map.

Upsampling a model-size label map to a 12-megapixel photo's size and handing that to a PNG encoder is expensive
(docs/performance.md, 'Figures behind the code's comments'), and nearly all of it is repetition: nearest-neighbour
upsampling repeats each row about 8 times and each column as often. So each distinct row is expanded once and
deflated; each run of repeated rows is written with PNG's Up filter, which turns it into zeros, and that run's
deflate bytes are computed once per run length and reused. The pixels are exactly those of upsample_labels
(tests/test_postprocess_speed_paths compares them); only the compressed bytes differ.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

from server.core.postprocess import (
    ClassShare,
    class_shares,
    class_shares_of_upsampled,
    encode_mask_png,
    nearest_sources,
    upsample_labels,
)
from server.labels import Label

_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ADLER_MOD = 65521
_LEVEL = 6
_FILTER_NONE, _FILTER_UP = b"\x00", b"\x02"


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _deflater() -> zlib._Compress:
    # Raw deflate (no zlib header): the pieces are joined into one stream, framed once at the end.
    return zlib.compressobj(_LEVEL, zlib.DEFLATED, -15, 9, zlib.Z_RLE)


@functools.lru_cache(maxsize=64)
def _repeated_rows(width: int, count: int) -> bytes:
    """Deflate bytes of `count` rows that repeat the row above (Up filter, all zeros), byte-aligned and
    independent of what came before, so they can be spliced anywhere between full flushes."""
    deflater = _deflater()
    return deflater.compress((_FILTER_UP + bytes(width)) * count) + deflater.flush(zlib.Z_FULL_FLUSH)


def _adler_after_repeats(adler: int, width: int, count: int) -> int:
    """zlib.adler32 continued over `count` Up-filtered zero rows, without building them: each row adds 2
    to the byte sum, then `width` zeros add the running sum to the second sum `width` times."""
    a, b = adler & 0xFFFF, adler >> 16
    for _ in range(count):
        a = (a + 2) % _ADLER_MOD
        b = (b + a + width * a) % _ADLER_MOD
    return (b << 16) | a


def encode_upsampled_mask_png(label_map: np.ndarray, size: tuple[int, int], palette: bytes) -> bytes:
    """A palette PNG of `label_map` upsampled (nearest neighbour, as Pillow does) to `size` = (width,
    height), with `palette` (768 bytes, RGB per index) as its colours."""
    width, height = size
    rows = nearest_sources(height, label_map.shape[0])
    wide = np.ascontiguousarray(label_map[:, nearest_sources(width, label_map.shape[1])], dtype=np.uint8)
    # Runs of output rows that copy the same source row: (source row, how many output rows).
    starts = np.flatnonzero(np.diff(rows, prepend=-1))
    lengths = np.diff(starts, append=height)
    deflater = _deflater()
    pieces: list[bytes] = []
    adler = 1
    for start, length in zip(starts.tolist(), lengths.tolist(), strict=True):
        row = _FILTER_NONE + wide[rows[start]].tobytes()
        pieces.append(deflater.compress(row))
        adler = zlib.adler32(row, adler)
        if length > 1:
            pieces.append(deflater.flush(zlib.Z_FULL_FLUSH))
            pieces.append(_repeated_rows(width, length - 1))
            adler = _adler_after_repeats(adler, width, length - 1)
    pieces.append(deflater.flush(zlib.Z_FINISH))
    # zlib framing: deflate, 32 KiB window, default level flags (0x78 0x9c), then the Adler-32 of the data.
    idat = b"\x78\x9c" + b"".join(pieces) + struct.pack(">I", adler)
    header = struct.pack(">IIBBBBB", width, height, 8, 3, 0, 0, 0)  # 8-bit palette, no interlace
    return (
        _SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"PLTE", palette) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


UPSAMPLE_FROM = 3
"""Row repetition from which the direct path is cheaper; below it Pillow's path wins (docs/performance.md,
'Figures behind the code's comments')."""


def mask_png_and_shares(
    label_map: np.ndarray, size: tuple[int, int], palette: bytes, labels: tuple[Label, ...]
) -> tuple[bytes, list[ClassShare]]:
    """The palette PNG of `label_map` at `size` and its class shares, by whichever path is cheaper for this
    much upsampling. Where the full-size mask is made anyway, its histogram gives the shares, cheaper than the
    weighted count of the small map, which is for when no full-size mask is made."""
    if size[1] >= UPSAMPLE_FROM * label_map.shape[0]:
        return encode_upsampled_mask_png(label_map, size, palette), class_shares_of_upsampled(label_map, size, labels)
    mask = upsample_labels(label_map, size)
    return encode_mask_png(mask, palette), class_shares(mask, labels)
