"""Text stored inside a PNG file: the input a predicted mask was made from travels with the mask itself.

A PNG is a signature and a sequence of chunks (length, type, data, CRC). An ``iTXt`` chunk holds a keyword
and UTF-8 text, so any path (Chinese folder names too) fits; readers that do not know the keyword skip it.
The chunk goes right after the header chunk, so reading it back never touches the pixels.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

SIGNATURE = b"\x89PNG\r\n\x1a\n"
HEADER_END = len(SIGNATURE) + 8 + 13 + 4  # signature, then IHDR: length and type, 13 bytes of data, CRC
# How far into a file to look: chunks after the header and before the pixels are small; a mask's paths fit.
READ_LIMIT = 1 << 16


def _chunk(kind: bytes, data: bytes) -> bytes:
    """One chunk: its data's length, its type, the data and the CRC of type and data."""
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def with_text(encoded: bytes, key: str, text: str) -> bytes:
    """``encoded`` (a whole PNG file) with an uncompressed iTXt chunk ``key``: ``text`` after its header.

    Raises:
        ValueError: ``encoded`` is not a PNG, or ``key`` is not 1 to 79 printable Latin-1 characters.
    """
    if not encoded.startswith(SIGNATURE) or encoded[12:16] != b"IHDR":
        raise ValueError("not a PNG file: expected the PNG signature and its IHDR chunk first")
    if not 1 <= len(key) <= 79 or not all(32 < ord(c) < 256 and c.isprintable() for c in key):
        raise ValueError(f"PNG text key {key!r}: expected 1 to 79 printable Latin-1 characters without spaces")
    # keyword, null, compression flag 0 and method 0, empty language tag and translated keyword, the text
    data = key.encode("latin-1") + b"\x00\x00\x00\x00\x00" + text.encode("utf-8")
    return encoded[:HEADER_END] + _chunk(b"iTXt", data) + encoded[HEADER_END:]


def read_texts(path: Path) -> dict[str, str]:
    """Every text stored in an uncompressed iTXt chunk before the PNG's pixels, by key; empty where the file is
    missing, unreadable, not a PNG, or holds none."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(READ_LIMIT)
    except OSError:
        return {}
    texts: dict[str, str] = {}
    position = len(SIGNATURE)
    while head.startswith(SIGNATURE) and position + 8 <= len(head):
        (length,) = struct.unpack(">I", head[position : position + 4])
        kind, data = head[position + 4 : position + 8], head[position + 8 : position + 8 + length]
        if kind == b"IDAT" or len(data) < length:
            break  # the pixels begin, or the chunk runs past what was read
        key, _, rest = data.partition(b"\x00")
        text = _itxt_text(rest) if kind == b"iTXt" else None
        if text is not None:
            texts[key.decode("latin-1")] = text
        position += 12 + length
    return texts


def _itxt_text(rest: bytes) -> str | None:
    """The text of an iTXt chunk's data after its keyword and null: None where it is compressed or malformed."""
    if rest[:1] != b"\x00":
        return None  # compressed: masks are never written so
    try:
        language_end = rest.index(b"\x00", 2)
        text_start = rest.index(b"\x00", language_end + 1) + 1
        return rest[text_start:].decode("utf-8")
    except (ValueError, UnicodeDecodeError):
        return None
