"""The training loop, its callbacks, seeding and per-seed ensembles."""

from tympan.training.loop import (
    EpochLog,
    SeedResult,
    SeedTrainer,
    fit,
    predict,
    resolve_device,
)

__all__ = ["EpochLog", "SeedResult", "SeedTrainer", "fit", "predict", "resolve_device"]
