"""A cheap content fingerprint of a model folder's weights: what a cache keyed on "this base model" must hold, so
that weights changed under the same path (retrained, rescaled, another checkpoint copied over) are never taken for
the old ones.

Hashing every byte of a 7B model reads 14 GB at every start; this reads a few MB. Per `.safetensors` file
(sorted by name): its name and size, its whole header (the 8-byte length and the JSON that names every tensor with
its dtype, shape and byte range), and, per tensor, three windows of its bytes (the first, middle and last
:data:`WINDOW` bytes; the whole tensor when shorter than three windows). A change of shape, dtype, names or file
layout changes the header; any change that touches a whole tensor (a fine-tune, a rescaled or re-initialised
matrix, another checkpoint of the same architecture) changes its windows. What it would miss: an edit confined to a
few elements of a tensor away from its windows; the folder's file sizes and mtimes cannot catch that either, and a
full hash would cost a read of every weight at every start. `.bin` weights (not loaded by memlens: safetensors
only) enter by name and size.

The fingerprint of a folder is computed once per process for each (file, size, mtime) seen.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

WINDOW = 4096  # bytes read at the start, middle and end of each tensor
_SEEN: dict[tuple[str, int, int], str] = {}


def _tensor_windows(handle, start: int, end: int) -> list[bytes]:
    """The bytes of [start, end) read at three places (all of it when short)."""
    if end - start <= 3 * WINDOW:
        handle.seek(start)
        return [handle.read(end - start)]
    middle = start + (end - start) // 2 - WINDOW // 2
    out = []
    for offset in (start, middle, end - WINDOW):
        handle.seek(offset)
        out.append(handle.read(WINDOW))
    return out


def safetensors_fingerprint(path: str | Path) -> str:
    """SHA-256 of one `.safetensors` file's size, header and sampled tensor bytes (see the module)."""
    path = Path(path)
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _SEEN:
        return _SEEN[key]
    digest = hashlib.sha256(str(stat.st_size).encode())
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", head)
        header = handle.read(length)
        digest.update(head + header)
        try:
            tensors = json.loads(header)
        except (ValueError, UnicodeDecodeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
        data_start = 8 + length
        for name in sorted(k for k in tensors if k != "__metadata__"):
            begin, end = tensors[name]["data_offsets"]
            for window in _tensor_windows(handle, data_start + begin, data_start + end):
                digest.update(window)
    _SEEN[key] = digest.hexdigest()
    return _SEEN[key]


def weights_fingerprint(folder: str | Path) -> str | None:
    """The fingerprint of a model folder's weights (every `*.safetensors` file, and `*.bin` files by name and size),
    or None when `folder` is not a local folder (a hub name: its snapshot is named by its revision)."""
    folder = Path(folder)
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.safetensors")):
        digest.update(f"{path.name}:{safetensors_fingerprint(path)};".encode())
    for path in sorted(folder.glob("*.bin")):
        digest.update(f"{path.name}:{path.stat().st_size};".encode())
    return digest.hexdigest()


__all__ = ["WINDOW", "safetensors_fingerprint", "weights_fingerprint"]
