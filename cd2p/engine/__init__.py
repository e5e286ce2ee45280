"""The training engine shared by pre-training and every fine-tuning task."""

from cd2p.engine.augment import random_subsample, scale_and_translate, step_generator
from cd2p.engine.checkpoint import (
    CheckpointDamaged,
    NoIntactCheckpoint,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from cd2p.engine.distributed import DistInfo, init_distributed
from cd2p.engine.metrics_log import plot_metrics, read_metrics, sparkline
from cd2p.engine.schedule import StepPlan, lr_at
from cd2p.engine.trainer import (
    EpochBatchSampler,
    RunResult,
    StepContext,
    Trainer,
    TrainingDiverged,
    TrainingInterrupted,
    check_run_dir,
    default_param_groups,
    seed_everything,
    weights_sha256,
)

__all__ = [
    "CheckpointDamaged",
    "DistInfo",
    "EpochBatchSampler",
    "NoIntactCheckpoint",
    "RunResult",
    "StepContext",
    "StepPlan",
    "Trainer",
    "TrainingDiverged",
    "TrainingInterrupted",
    "check_run_dir",
    "default_param_groups",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "lr_at",
    "plot_metrics",
    "random_subsample",
    "read_metrics",
    "save_checkpoint",
    "scale_and_translate",
    "seed_everything",
    "sparkline",
    "step_generator",
    "verify_checkpoint",
    "weights_sha256",
]
