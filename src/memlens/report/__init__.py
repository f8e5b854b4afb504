"""The study report: :func:`analyse` a study folder into a :class:`StudyAnalysis`, then render it as
`report/index.html` (self-contained), `report/figures/*.png` and `report/tables/*.csv`
(:func:`build_report`) or as a Markdown findings document (:func:`memlens.report.markdown.write_findings`)."""

from memlens.report.analysis import StudyAnalysis, analyse
from memlens.report.build import build_report, report_is_current

__all__ = ["StudyAnalysis", "analyse", "build_report", "report_is_current"]
