"""Auditing a model someone already fine-tuned (`memlens audit`, `memlens.audit(...)`): the study's engine pointed
at any PEFT adapter, full model or memlens run, on records known to be members and records known not to be.
The workflow is :mod:`memlens.auditing.run`; what the target is, :mod:`memlens.auditing.target`; its records,
:mod:`memlens.auditing.records`; the report, :mod:`memlens.report.audit`. (Named `auditing`, not `audit`: importing a
subpackage `memlens.audit` would replace the function `memlens.audit` on the package.)"""

from memlens.auditing.run import AuditSummary, audit

__all__ = ["AuditSummary", "audit"]
