"""Training (issue 7): `TrainConfig`, `Trainer`, and `run` (the whole `hsae train` job)."""
from .config import TrainConfig
from .trainer import Trainer, TrainingDiverged

__all__ = ["TrainConfig", "Trainer", "TrainingDiverged"]
