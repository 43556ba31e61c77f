"""Studies: a TOML config → a resumable run → results.jsonl, checkpoints, report.html."""

from ridgeline.study.config import StudyConfig, config_from_dict, load_config
from ridgeline.study.context import StudyContext
from ridgeline.study.figures import figure_html, new_figure, table_html
from ridgeline.study.lock import RunLock
from ridgeline.study.registry import (
           Options,
           get_measurement,
           measurement_kinds,
           register_measurement,
)
from ridgeline.study.report import render_report, write_report
from ridgeline.study.runner import run_study
from ridgeline.study.store import ResultStore
from ridgeline.study.validate import validate_study

__all__ = ["StudyConfig", "load_config", "config_from_dict", "StudyContext", "run_study",
           "ResultStore", "write_report", "render_report", "register_measurement",
           "get_measurement", "measurement_kinds", "Options", "figure_html", "new_figure",
           "table_html", "validate_study", "RunLock"]
