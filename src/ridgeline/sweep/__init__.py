"""Sweeps: a grid × seeds of trainings, each measured, on local processes or Ray, and the
rank correlation of every measure with the generalization gap."""

from ridgeline.sweep import kind as _kind  # noqa: F401 - registers generalization_correlation
from ridgeline.sweep.config import SweepSpec, SweepTask, expand_sweep, sweep_spec
from ridgeline.sweep.correlation import granulated_tau, kendall_tau
from ridgeline.sweep.engines import InProcessEngine, LocalEngine, RayEngine, make_engine
from ridgeline.sweep.report import render_sweep_report, write_sweep_report
from ridgeline.sweep.runner import SweepOutcome, is_sweep, refresh_correlation, run_sweep
from ridgeline.sweep.task import TaskResult, generalization, run_task

__all__ = ["SweepSpec", "SweepTask", "expand_sweep", "sweep_spec", "kendall_tau",
           "granulated_tau", "InProcessEngine", "LocalEngine", "RayEngine", "make_engine",
           "render_sweep_report", "write_sweep_report", "SweepOutcome", "is_sweep",
           "refresh_correlation", "run_sweep", "TaskResult", "generalization", "run_task"]
