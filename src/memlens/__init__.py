"""memlens: measure what fine-tuned language models memorize of their fine-tuning data.

The Python API (the same engine as the `memlens` command line)::

    import memlens

    study = memlens.load_study("examples/quickstart-tiny.yaml", ["out=memlens-out/quick"])
    summary = memlens.run_study(study)            # fine-tune -> attack -> report, resumable
    report = memlens.build_report(summary.out)    # rebuild report/index.html
    scores, results = memlens.attack_models(base, {"name": adapter_dir}, members, non_members)
    audited = memlens.audit(target="my-adapter", members="train.jsonl", non_members="held-out.jsonl")

Names are imported on first use, so `import memlens` stays light (no torch until a function needs it).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("memlens")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

# public name -> module that defines it
_API = {
    "StudyConfig": "memlens.config",
    "ConfigError": "memlens.config",
    "load_study": "memlens.config",
    "run_study": "memlens.runner",
    "StudySummary": "memlens.runner",
    "write_report": "memlens.runner",
    "study_status": "memlens.study.cell",
    "attack_models": "memlens.attacks.mia",
    "audit": "memlens.auditing",
    "build_report": "memlens.report",
    "StudyLayout": "memlens.store",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'memlens' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
