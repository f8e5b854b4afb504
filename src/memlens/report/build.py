"""Build the study report: analyse the study folder, then render it as HTML."""

from __future__ import annotations

import json
from pathlib import Path

from memlens.report.analysis import analyse
from memlens.report.audit import write_audit_report
from memlens.report.html import INPUTS_STAMP, RenderedReport, write_html
from memlens.report.inputs import inputs_fingerprint
from memlens.store import StudyLayout


def build(root: Path) -> RenderedReport:
    """Write `<root>/report/` (index.html, figures/, tables/) from the study folder's files."""
    return write_html(analyse(root))


def build_report(root: Path) -> Path:
    """Write `<root>/report/` from the study folder's files (an audit folder's: its report and model card, see
    :mod:`memlens.report.audit`); returns the path of index.html."""
    if StudyLayout(Path(root)).is_audit:
        return write_audit_report(root).index
    return build(root).index


def report_is_current(root: Path) -> bool:
    """True when report/index.html was built from the study's current files."""
    layout = StudyLayout(Path(root))
    stamp = layout.report / INPUTS_STAMP
    if not (layout.report / "index.html").exists() or not stamp.exists():
        return False
    return json.loads(stamp.read_text()) == json.loads(json.dumps(inputs_fingerprint(layout)))
