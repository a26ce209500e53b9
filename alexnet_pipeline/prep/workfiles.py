"""Prep's work files, `OUT/.work/<split>/<unit>.unit`: the one writer and reader of that format.

A work file holds one unit's prepared JPEGs, in the order their shards will take them (the split's order:
train by the seeded order key, val by key), then a JSON header (keys, labels, offsets, sizes, skipped files,
the statistics' small sums), the per-pixel sums' raw bytes, and a 24-byte trailer: the JPEG bytes' length, the
header's length, a CRC32 of everything before the trailer, and a magic. It appears by an atomic rename (its
presence marks the unit done) but is not fsynced (a unit of one image would spend most of its time there): a
resumed run checks the CRC of each work file it finds and redoes those a crash left short or damaged.

Because every work file is in the split's order, the shard stage, which writes shards in that order, reads
each work file front to back: `read_jpegs` takes offsets in ascending order and holds one file open.
Imports only files and stats.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .. import files
from .stats import Moments

SUFFIX = ".unit"
# JPEG bytes, header bytes (JSON), CRC32 of everything before the trailer, magic
_TRAILER = struct.Struct("<QQI4s")
_MAGIC = b"APU2"


def write(path: Path, jpegs: list[bytes], header: dict, moments: Moments | None) -> None:
    """One work file: the JPEGs in the given order (their offsets and sizes go into the header), the header,
    the per-pixel sums, the trailer."""
    offsets, at = [], 0
    for j in jpegs:
        offsets.append(at)
        at += len(j)
    header = {**header, "offsets": offsets, "sizes": [len(j) for j in jpegs]}
    pixels = b""
    if moments is not None:
        arrays = moments.to_arrays()
        header.update(n_images=int(arrays["n_images"]), outer_sum=arrays["outer_sum"].tolist(),
                      plane_sum=[arrays["plane_sum"].dtype.str, list(arrays["plane_sum"].shape)])
        pixels = arrays["plane_sum"].tobytes()
    head = json.dumps(header).encode()
    body = b"".join((*jpegs, head, pixels))
    files.atomic_write(path, body + _TRAILER.pack(at, len(head), zlib.crc32(body), _MAGIC), durable=False)


def read_header(path: Path) -> tuple[dict, Moments | None]:
    """The header and statistics of a work file (its JPEGs stay on disk, at the offsets the header lists)."""
    with open(path, "rb") as f:
        f.seek(-_TRAILER.size, os.SEEK_END)
        end = f.tell()
        n_jpeg, n_head = _TRAILER.unpack(f.read(_TRAILER.size))[:2]
        f.seek(n_jpeg)
        rest = f.read(end - n_jpeg)
    header = json.loads(rest[:n_head])
    if "plane_sum" not in header:
        return header, None
    dtype, shape = header["plane_sum"]
    arrays = {"n_images": header["n_images"], "outer_sum": np.array(header["outer_sum"], np.int64),
              "plane_sum": np.frombuffer(rest, dtype, offset=n_head).reshape(shape)}
    return header, Moments.from_arrays(arrays)


def intact(path: Path) -> bool:
    """Whether a work file is whole: its trailer and the CRC32 of its contents (what a crash before the page
    cache reached the disk would break). Read in 4 MiB pieces: a unit holds 2 MB, a class archive's 40."""
    crc, size = 0, os.path.getsize(path)
    if size < _TRAILER.size:
        return False
    with open(path, "rb") as f:
        left = size - _TRAILER.size
        while left:
            piece = f.read(min(left, 1 << 22))
            if not piece:
                return False
            crc, left = zlib.crc32(piece, crc), left - len(piece)
        n_jpeg, n_head, want, magic = _TRAILER.unpack(f.read(_TRAILER.size))
    return magic == _MAGIC and n_jpeg + n_head <= size - _TRAILER.size and crc == want


def read_jpegs(path: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes at `spans` ((offset, size), in ascending offset order) of one work file, one open file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return [os.pread(fd, size, offset) for offset, size in spans]
    finally:
        os.close(fd)
