"""Path attribution and tree use of a run (SPEC 6): `analyze_run` writes analysis.json and analysis.md."""
from .analyze import analyze_run
from .paths import PathStats

__all__ = ["analyze_run", "PathStats"]
