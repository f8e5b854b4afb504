"""On-disk cache of scores that do not change across runs (the base model's, with adapters disabled).

An entry is keyed by a hash of everything that determines it: the model (config, resolved dtype,
weight files), the adapter (`None` for the base model), the exact token ids scored (which fixes the
texts and the tokenizer) and the scoring settings. Entries are `.npz` files written atomically, so
concurrent processes (Ray workers) at worst compute the same entry twice and never read half of one.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from memlens.config import ModelConfig, stable_hash
from memlens.models.fingerprint import weights_fingerprint
from memlens.score.engine import SequenceStats
from memlens.store import atomic_write_bytes, read_cache


def tokens_hash(sequences: Sequence[Sequence[int]]) -> str:
    """Hash of a list of token-id sequences (order and boundaries included)."""
    digest = hashlib.sha256()
    lengths = np.fromiter((len(s) for s in sequences), dtype=np.int64, count=len(sequences))
    digest.update(lengths.tobytes())
    for seq in sequences:
        digest.update(np.asarray(seq, dtype=np.int64).tobytes())
    return digest.hexdigest()


def model_fingerprint(cfg: ModelConfig, dtype: str) -> dict:
    """What identifies the base model's weights: its config, resolved dtype and, for a local folder, the
    hash of config.json, the names and sizes of its weight files and their content fingerprint
    (:func:`memlens.models.fingerprint.weights_fingerprint`: weights changed in place change it)."""
    print_ = {"model": cfg.model_dump(exclude={"device"}), "dtype": dtype}
    path = Path(cfg.name_or_path)
    if path.is_dir():
        config = path / "config.json"
        print_["config_sha"] = hashlib.sha256(config.read_bytes()).hexdigest() if config.exists() else None
        print_["weights"] = sorted((p.name, p.stat().st_size) for p in path.glob("*.safetensors"))
        print_["weights_content"] = weights_fingerprint(path)
    return print_


def cache_path(cache_dir: Path, key_parts: dict) -> Path:
    return Path(cache_dir) / f"scores-{stable_hash(key_parts)[:24]}.npz"


def cached_token_stats(cache_dir: Path | None, key_parts: dict,
                       compute: Callable[[], SequenceStats]) -> tuple[SequenceStats, bool]:
    """Load the stats keyed by `key_parts` from `cache_dir`, or compute and store them.
    Returns (stats, hit). `cache_dir=None` disables caching."""
    if cache_dir is None:
        return compute(), False
    path = cache_path(cache_dir, key_parts)

    def load(p: Path) -> SequenceStats:
        with np.load(p, allow_pickle=False) as arrays:
            return SequenceStats.from_arrays(arrays)

    cached = read_cache(path, load)
    if cached is not None:
        return cached, True
    stats = compute()
    buffer = io.BytesIO()
    np.savez(buffer, **stats.to_arrays(), key=np.array(json.dumps(key_parts, sort_keys=True, default=str)))
    atomic_write_bytes(path, buffer.getvalue())
    return stats, False
