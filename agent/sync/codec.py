"""Outbox payload compression (zstandard) and the v2 message frame the drain publishes.

Measured on the outage benchmark's window documents and rollup chunks (``scripts/bench/bench_outage.py``
prints the table): packed records of one kind compress 8-20x at level 3; higher levels gain a few
percent for several times the CPU, and a trained dictionary pays off only for records of a few hundred
bytes, which the outbox no longer stores one by one (events, decisions and rollups are packed per
window or chunk). So: one zstandard frame per stored record, level 3, no dictionary; records under
``MIN_PACK`` bytes or that do not shrink by 10 % stay plain JSON text.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import zstandard

PLAIN = 0
ZSTD = 1
LEVEL = 3
MIN_PACK = 256
MAGIC = b"\x28\xb5\x2f\xfd"  # the zstandard frame magic number: how a consumer tells v2 messages apart

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    # zstandard (de)compressor objects must not be shared between threads running at once
    c: zstandard.ZstdCompressor | None = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(level=LEVEL)
    return c


def _decompressor() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


def compress(data: bytes) -> bytes:
    return _compressor().compress(data)


def decompress(data: bytes) -> bytes:
    # frames written by compress() carry their content size, so no max_output_size is needed; a frame
    # without it (not ours) is read as a stream
    try:
        return _decompressor().decompress(data)
    except zstandard.ZstdError:
        return _decompressor().decompressobj().decompress(data)


def pack(text: str) -> tuple[str | bytes, int]:
    """(stored payload, encoding) of one record's JSON text."""
    data = text.encode()
    if len(data) < MIN_PACK:
        return text, PLAIN
    packed = compress(data)
    if len(packed) > 0.9 * len(data):
        return text, PLAIN
    return packed, ZSTD


def unpack(payload: str | bytes, enc: int) -> str:
    """The JSON text of a stored record."""
    if isinstance(payload, str):
        return payload
    return decompress(payload).decode() if enc == ZSTD else payload.decode()


def decode_message(body: bytes) -> Any:
    """A consumer's view of one drained MQTT message: v2 (a zstandard frame) or v1 (plain JSON)."""
    if body[:4] == MAGIC:
        body = decompress(body)
    return json.loads(body)
