"""The study report: `report/index.html` (self-contained), `report/figures/*.png`, `report/tables/*.csv`."""

from memlens.report.build import build_report, report_is_current

__all__ = ["build_report", "report_is_current"]
