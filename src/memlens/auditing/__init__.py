"""Auditing a model someone already fine-tuned (`memlens audit`, `memlens.audit(...)`): the study's engine pointed
at any PEFT adapter, full model or memlens run, on records known to be members and records known not to be.
The workflow is :mod:`memlens.auditing.run`; what the target is, :mod:`memlens.auditing.target`; its records,
:mod:`memlens.auditing.records`; the report, :mod:`memlens.report.audit`. (Named `auditing`, not `audit`: importing a
subpackage `memlens.audit` would replace the function `memlens.audit` on the package.)"""

from __future__ import annotations

import importlib

__all__ = ["AuditSummary", "audit"]


def __getattr__(name: str):
    """`audit` and `AuditSummary`, imported on first use: the workflow imports torch, and the command line checks an
    audit's inputs (:mod:`memlens.auditing.target`, records and settings) before it needs them."""
    if name in __all__:
        return getattr(importlib.import_module("memlens.auditing.run"), name)
    raise AttributeError(f"module 'memlens.auditing' has no attribute {name!r}")
