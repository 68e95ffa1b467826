"""A data report for people: one self-contained HTML page, plus each plot as a PNG.

:func:`build_report` (in :mod:`.report`) writes the page; :func:`report_metrics` (in
:mod:`.metrics`) gives its key figures; :mod:`.sections` builds each section from
:mod:`.plots` (figures) and :mod:`.render` (HTML).
"""

from imgsearch.data.eda.metrics import report_metrics
from imgsearch.data.eda.render import NOT_IN_CATALOG
from imgsearch.data.eda.report import EdaConfig, build_report

__all__ = ["NOT_IN_CATALOG", "EdaConfig", "build_report", "report_metrics"]
