"""The test fixtures of a fresh machine: stand-ins for `../shared`, built from the demo's synthetic notes.

The same layout as `../shared` (so anything given a shared folder, the benchmarks and `memlens demo` included,
reads them as it reads the real ones):

- `data/phee/{train,test,dev}.jsonl`: PHEE's splits and sizes, synthetic adverse-drug-event notes with ids
  `<doc>_<n>` (`memlens.demo.write_phee_shaped`);
- `models/llama-tiny`: llama-tiny's shape (4 x 192, 4 heads, MLP 512, 512 positions, float16 weights),
  pretrained on a disjoint corpus of the same notes with the demo's byte-level BPE tokenizer (2,048 tokens,
  one per digit, with words no record uses as a wider tokenizer has) until its loss flattens (80 steps);
- `models/llama-small` and `models/gpt2-small`: the real ones' shapes (6 x 384 Llama; 4 x 384 GPT-2 with its
  fused `c_attn`, 512 positions), same tokenizer, bfloat16 weights, not pretrained: the tests use them for
  their shapes and modules only (anything that needs their pretraining is marked `real_fixtures`).

Built once into a folder keyed by everything it depends on (this file, `memlens/demo.py`, the versions of the
libraries that make it), atomically and under a file lock: two pytest-xdist workers never build it twice, and
a killed build leaves nothing a reader would take.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from importlib import metadata
from pathlib import Path

# the files that make a folder a complete set of fixtures (real or synthetic)
REQUIRED = ("data/phee/train.jsonl", "data/phee/test.jsonl", "data/phee/dev.jsonl",
            "models/llama-tiny/config.json", "models/llama-small/config.json", "models/gpt2-small/config.json")
MARK = "memlens-synthetic-fixtures.json"  # the build's record, at the root of a synthetic set
TOKENIZER_VOCAB = 2048
LLAMA_TINY_STEPS = 80  # dev loss 1.17 nats/token at 80 steps, 1.12 at 120 (the notes' random values: ~0.85)


def missing(folder: Path) -> list[str]:
    """The fixture files `folder` lacks (none: it holds the whole set)."""
    return [name for name in REQUIRED if not (folder / name).is_file()]


def is_synthetic(folder: Path) -> bool:
    """Whether `folder` is a set built here (which the tests marked `real_fixtures` cannot use)."""
    return (folder / MARK).is_file()


def cache_key() -> str:
    """What the synthetic fixtures depend on: their builders' code and the libraries that run it."""
    import memlens.demo

    digest = hashlib.sha256()
    for path in (Path(__file__), Path(memlens.demo.__file__)):
        digest.update(path.read_bytes())
    for package in ("torch", "transformers", "tokenizers", "numpy"):
        digest.update(f"{package}=={metadata.version(package)}".encode())
    return digest.hexdigest()[:16]


def folder_for(cache: Path) -> Path:
    """Where the synthetic fixtures of this code live under `cache` (built or not)."""
    return cache / "memlens-fixtures" / cache_key()


def ensure(folder: Path) -> Path:
    """Build the synthetic fixtures into `folder` unless they are there; returns `folder`. Safe under concurrent
    callers (a file lock: the second waits, then finds them built); removes other keys' stale builds."""
    from filelock import FileLock

    if not missing(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / "build.lock")):
        if missing(folder):  # not built by whoever held the lock before
            for stale in folder.parent.iterdir():
                if stale.is_dir() and stale.name != folder.name:
                    shutil.rmtree(stale, ignore_errors=True)
            _build_atomically(folder)
    return folder


def _build_atomically(folder: Path) -> None:
    from memlens.store import atomic_dir

    with atomic_dir(folder) as tmp:
        build(tmp)


def _other_words(n: int = 600, seed: int = 0) -> list[str]:
    """Lines of `n` made-up words the records never use, for the tokenizer only: like a tokenizer trained on a
    wider corpus, it then has word tokens no record produces (the designed canaries' rare tokens)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    syllables = [c + v for c in "bdfgklmnprstvz" for v in ("a", "e", "i", "o", "u", "ai", "ou")]
    words = sorted({"".join(rng.choice(syllables, int(rng.integers(2, 4)))) for _ in range(n)})
    return [" ".join(rng.permutation(words)[:12]) for _ in range(len(words) * 2)]


def build(root: Path) -> None:
    """Write the whole set of synthetic fixtures under `root` (the layout of `../shared`)."""
    import torch
    from transformers import GPT2Config

    from memlens.demo import build_tokenizer, pretrain_model, tiny_llama_config, write_phee_shaped

    (root / "data/phee").mkdir(parents=True)
    corpus = write_phee_shaped(root / "data/phee")
    tokenizer_dir = root / "tokenizer"
    tokenizer = build_tokenizer(corpus, tokenizer_dir, vocab_size=TOKENIZER_VOCAB, max_length=256,
                                extra=_other_words())
    models = {
        "llama-tiny": (tiny_llama_config(tokenizer, hidden=192, layers=4, heads=4, intermediate=512, positions=512),
                       LLAMA_TINY_STEPS, torch.float16),
        "llama-small": (tiny_llama_config(tokenizer, hidden=384, layers=6, heads=6, intermediate=1024,
                                          positions=512), 0, torch.bfloat16),
        "gpt2-small": (GPT2Config(vocab_size=len(tokenizer), n_embd=384, n_layer=4, n_head=6, n_positions=512,
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id), 0, torch.bfloat16),
    }
    for name, (config, steps, dtype) in models.items():
        folder = root / "models" / name
        shutil.copytree(tokenizer_dir, folder)  # one tokenizer for all, as the real fixtures share theirs
        pretrain_model(config, corpus, tokenizer, folder, steps=steps, save_dtype=dtype)
    shutil.rmtree(tokenizer_dir)
    (root / "README.md").write_text(
        "Synthetic stand-ins for the shared test fixtures, built by tests/synthetic_fixtures.py; safe to delete.\n")
    (root / MARK).write_text(json.dumps({"key": cache_key(), "llama_tiny_steps": LLAMA_TINY_STEPS}))
