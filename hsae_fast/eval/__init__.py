"""Evaluation of a run (SPEC 7): `evaluate_run` writes RUN_DIR/metrics.json."""
from .evaluate import evaluate_run, health_verdict
from .runs import EvalData, Run, load_run
from .stats import CodeStats

__all__ = ["evaluate_run", "health_verdict", "EvalData", "Run", "load_run", "CodeStats"]
