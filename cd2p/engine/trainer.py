"""One training loop for every cd2p task: pre-training and all fine-tuning.

The task supplies a module whose ``forward(batch: dict)`` returns a dict holding the scalar
``loss`` (and, optionally, detached scalar components named ``loss_*`` that are logged), a
map-style ``Dataset`` of dict samples, and optionally a ``collate_fn``, a ``prepare_batch``
hook (augmentation, a frozen teacher... run under ``no_grad`` on the device before the
forward), an ``evaluate(model) -> metrics`` callback with best-metric tracking and an
``on_best`` export hook, and custom optimiser param groups (``lr_scale`` per group for
layer-wise decay). The :class:`Trainer` does the rest from the recipe's ``data``, ``optim``,
``schedule`` and ``run`` sections: AdamW, warm-up + cosine, gradient clipping, bf16 autocast
on CUDA (fp32 on CPU), ``torch.compile``, DDP under ``torchrun``, gradient accumulation
(``optim.accumulate_steps``), checkpoints and exact resume, ``metrics.jsonl`` (and TensorBoard /
W&B, ``run.loggers``), a progress bar on a terminal or plain progress lines in a log file, and a
checkpoint when SIGINT / SIGTERM stops the run (:class:`TrainingInterrupted`).

Exact resume: the batches of an epoch are a pure function of ``(seed, epoch)``
(:class:`EpochBatchSampler`), the per-step augmentation generator a pure function of
``(seed, step, rank)``, the learning rate a pure function of ``step``, and the global RNGs
(dropout, stochastic depth, MAE masks) are saved with every checkpoint. A run stopped after
its checkpoint at step ``k`` and resumed therefore ends with bit-identical weights.

Damage and divergence: a resume verifies the checkpoint it starts from and falls back to the
newest intact one, warning about each damaged file (:func:`.checkpoint.latest_checkpoint`).
The loss and the weights are checked to be finite where the trainer waits for the device
anyway: every logged step, before an evaluation, and at a checkpoint (the optimiser state
too). A run that diverged stops with :class:`TrainingDiverged` before anything non-finite is
saved, so its last finite checkpoints stay on disk, whatever ``run.keep_checkpoints`` says.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
import resource
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from cd2p._atomic import remove_stale_temporaries
from cd2p._text import plain_console, styled
from cd2p.config import Recipe, save_recipe, to_dict
from cd2p.data.epochs import EpochIndex
from cd2p.engine import distributed as D
from cd2p.engine.augment import step_generator
from cd2p.engine.checkpoint import (
    CHECKPOINTS,
    NoIntactCheckpoint,
    capture_rng_state,
    first_nonfinite,
    latest_checkpoint,
    load_checkpoint,
    optimizer_tensors,
    save_checkpoint,
)
from cd2p.engine.loggers import MetricLogger, open_loggers
from cd2p.engine.metrics_log import MetricsLog, truncate_metrics
from cd2p.engine.schedule import StepPlan, lr_at, set_lr

Batch = dict[str, Any]


# -- seeding and data order ------------------------------------------------------------------


def seed_everything(seed: int) -> None:
    """Seed Python ``random``, numpy and torch (CPU and every GPU)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled, rank-sharded batches whose order is a pure function of ``(seed, epoch)``.

    Every epoch draws one permutation of the dataset (the same on every rank), pads it to a
    multiple of ``world_size`` by wrapping around (as ``DistributedSampler`` does), gives rank
    ``r`` the indices ``r, r + world_size, ...`` and cuts them into batches of ``batch_size``,
    dropping the last incomplete one. :meth:`set_epoch` may skip the first batches of an epoch
    (a resumed run continues mid-epoch). With ``with_epoch`` the batches hold
    :class:`~cd2p.data.epochs.EpochIndex` keys ``(epoch, index)`` for datasets whose items
    are drawn afresh every epoch.
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        with_epoch: bool = False,
    ) -> None:
        if num_samples < 1:
            raise ValueError("the dataset is empty")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.with_epoch = with_epoch
        self.epoch = 0
        self.start_batch = 0
        self.per_rank = math.ceil(num_samples / world_size)
        if self.per_rank < batch_size:
            raise ValueError(
                f"the dataset has {num_samples} samples, {self.per_rank} per process, fewer than "
                f"one batch of {batch_size} per process: lower data.batch_size or add data"
            )

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.per_rank // self.batch_size

    def indices(self, epoch: int) -> list[int]:
        """This rank's sample order for ``epoch`` (all of it, before batching)."""
        if self.shuffle:
            gen = step_generator(self.seed, epoch, 0, stream="epoch-order")
            order = torch.randperm(self.num_samples, generator=gen).tolist()
        else:
            order = list(range(self.num_samples))
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / len(order)))[:total]
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.indices(self.epoch)
        for b in range(self.start_batch, len(self)):
            batch = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [EpochIndex(self.epoch, i) for i in batch] if self.with_epoch else batch


# -- helpers ---------------------------------------------------------------------------------


def default_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights with decay; biases, norms, tokens and queries without (Point-MAE),
    and whatever a submodule's ``no_weight_decay()`` names (timm's convention)."""
    declared = set()
    for prefix, module in model.named_modules():
        names = getattr(module, "no_weight_decay", None)
        if callable(names):
            declared |= {f"{prefix}.{n}" if prefix else n for n in names()}
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        leaf = name.rsplit(".", 1)[-1]
        if (
            param.ndim <= 1
            or leaf == "bias"
            or "token" in leaf
            or "queries" in leaf
            or name in declared
        ):
            no_decay.append(param)
        else:
            decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(
    param_groups: list[dict[str, Any]],
    name: str,
    lr: float,
    betas: Sequence[float],
    device: torch.device | None = None,
) -> torch.optim.Optimizer:
    """AdamW / Adam / SGD (momentum 0.9) over ``param_groups`` (each with its weight decay).

    Fused kernels on CUDA, multi-tensor (``foreach``) updates on CPU.
    """
    fast = {"fused": True} if device is not None and device.type == "cuda" else {"foreach": True}
    if name == "adamw":
        return torch.optim.AdamW(param_groups, lr=lr, betas=tuple(betas), **fast)
    if name == "adam":
        return torch.optim.Adam(param_groups, lr=lr, betas=tuple(betas), **fast)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=lr, momentum=0.9, foreach=True)
    raise ValueError(f"unknown optimizer {name!r}")


def move_to(batch: Any, device: torch.device) -> Any:
    """Tensors of a (nested) batch onto ``device``; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: move_to(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple) and batch and isinstance(batch[0], torch.Tensor):
        return type(batch)(move_to(v, device) for v in batch)
    return batch


def weights_sha256(model: nn.Module) -> str:
    """A checksum of a module's state dict (names and exact bytes, in name order)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a cluster job's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def loader_workers(requested: int, device: torch.device) -> int:
    """``data.num_workers`` as run: on a CPU-only run the workers share the cores with the
    training itself, so they never exceed the cores (minus the one that trains)."""
    if device.type == "cuda":
        return requested
    return max(0, min(requested, usable_cores() - 1))


def _ignore_stop_signals(_worker_id: int) -> None:
    # DataLoader workers leave Ctrl-C / SIGTERM to the main process, which checkpoints and
    # shuts them down; a worker killed by the signal would otherwise break the last fetch.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def split_batch(batch: Any, chunks: int) -> list[Any]:
    """Cut a batch into ``chunks`` equal micro-batches along its first dimension.

    Tensors and lists whose length is the batch size are sliced; nested dicts recursively;
    anything else (a scalar, a shared tensor of another length) is given to every chunk.
    """
    if chunks == 1:
        return [batch]

    def size_of(value: Any) -> int | None:
        if isinstance(value, torch.Tensor) and value.ndim:
            return value.shape[0]
        if isinstance(value, list | tuple):
            return len(value)
        if isinstance(value, dict):
            return next((s for s in map(size_of, value.values()) if s is not None), None)
        return None

    size = size_of(batch)
    if size is None or size % chunks:
        raise ValueError(
            f"a batch of {size} samples cannot be cut into optim.accumulate_steps={chunks} "
            "equal micro-batches"
        )
    step = size // chunks

    def take(value: Any, i: int) -> Any:
        if isinstance(value, dict):
            return {k: take(v, i) for k, v in value.items()}
        if size_of(value) == size and not isinstance(value, dict):
            return value[i * step : (i + 1) * step]
        return value

    return [take(batch, i) for i in range(chunks)]


class TrainingInterrupted(Exception):  # noqa: N818 (it is a stop, not an error)
    """SIGINT (Ctrl-C) or SIGTERM (a cluster's time limit) stopped :meth:`Trainer.fit`.

    The trainer finished the step it was in and wrote a checkpoint at ``step``;
    ``--resume RUN`` continues from it exactly.
    """

    def __init__(self, run_dir: Path, step: int, total_steps: int, checkpoint: Path | None,
                 signal_name: str) -> None:  # fmt: skip
        self.run_dir = run_dir
        self.step = step
        self.total_steps = total_steps
        self.checkpoint = checkpoint
        self.signal_name = signal_name
        super().__init__(
            f"{signal_name} at step {step} of {total_steps}: checkpoint written to {checkpoint}"
        )

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process stopped by the signal (130, 143)."""
        number = signal.SIGINT if self.signal_name == "SIGINT" else signal.SIGTERM
        return 128 + int(number)


class TrainingDiverged(FloatingPointError, ValueError):
    """The loss or the weights (or the optimiser state) stopped being finite.

    Raised at the first logged step, evaluation or checkpoint after it happened, before
    anything non-finite is written: ``checkpoint`` (the newest one on disk, ``None`` if none
    was written) and those before it are kept. A ``ValueError`` too, so that the CLI prints it
    as one line.
    """

    def __init__(self, run_dir: Path, step: int, problem: str, checkpoint: Path | None,
                 hint: str) -> None:  # fmt: skip
        self.run_dir = run_dir
        self.step = step
        self.problem = problem
        self.checkpoint = checkpoint
        last = (
            f"the last finite checkpoint is {checkpoint}"
            if checkpoint is not None
            else "no checkpoint was written before it"
        )
        super().__init__(f"training diverged at step {step}: {problem}; {last}; {hint}")


class _StopSignals:
    """While active, SIGINT / SIGTERM only set ``self.received`` (the trainer checkpoints and
    stops after the current step); a second Ctrl-C stops at once, without a checkpoint."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, _frame: Any) -> None:
        self.received = signal.Signals(signum).name
        # A second signal takes the default action (Ctrl-C: KeyboardInterrupt right away).
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    def __enter__(self) -> _StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *_: Any) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()


def check_run_dir(run_dir: str | Path, resume: bool) -> Path:
    """Refuse to train into a non-empty run directory unless resuming it."""
    run_dir = Path(run_dir)
    if resume:
        if not run_dir.is_dir():
            raise FileNotFoundError(f"cannot resume {run_dir}: no such run directory")
    elif run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"{run_dir} exists and is not empty; continue it with --resume {run_dir} "
            "or choose a new --out"
        )
    return run_dir


@dataclass
class StepContext:
    """What a ``prepare_batch`` hook knows about the step it prepares.

    generator: a generator on the training device seeded from ``(seed, step, rank)`` for
        augmentations (draw on ``generator.device``: no host copy, no sync).
    """

    step: int
    epoch: int
    rank: int
    device: torch.device
    generator: torch.Generator


@dataclass
class RunResult:
    """The outcome of :meth:`Trainer.fit` (the same on every rank)."""

    run_dir: Path
    step: int
    total_steps: int
    epoch: int
    completed: bool
    final_loss: float | None
    final_components: dict[str, float] = field(default_factory=dict)
    best: dict[str, Any] | None = None
    weights_sha256: list[str] = field(default_factory=list)
    checkpoint: Path | None = None
    resumed_from: int | None = None
    # Wall-clock seconds of training (evaluations and checkpoints included), summed over the
    # sessions of a resumed run.
    wall_seconds: float = 0.0


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# -- the trainer -----------------------------------------------------------------------------


class Trainer:
    """Train ``model`` on ``dataset`` as the recipe says, into ``run_dir``.

    Args:
        model: ``forward(batch) -> {"loss": scalar, "loss_*": detached scalars...}``. Its
            parameters must be initialised identically on every rank (seed before building it;
            DDP also broadcasts rank 0's weights).
        dataset: map-style dataset of samples that ``collate_fn`` turns into a batch dict.
        recipe: ``data.batch_size`` is the global batch (split over the ranks),
            ``data.num_workers`` the loader workers per rank; ``optim``, ``schedule`` and
            ``run`` as documented in :mod:`cd2p.config`.
        run_dir: where ``recipe.yaml``, ``metrics.jsonl`` and ``checkpoints/`` go.
        collate_fn: samples -> batch dict (default: torch's ``default_collate``).
        prepare_batch: ``(batch on device, StepContext) -> batch``, run under ``no_grad``.
        evaluate: ``model -> {metric: value}``, called on every rank (in eval mode) every
            ``run.eval_every`` epochs and at the end; it must return the same numbers on
            every rank (evaluate everything, or shard and all-reduce).
        best_metric, best_mode: the metric whose best value is tracked (``"max"``/``"min"``).
        on_best: ``(model, metrics)`` called on rank 0 when ``best_metric`` improves.
        param_groups: optimiser groups (``params``, ``weight_decay``, optional ``lr_scale``);
            default :func:`default_param_groups`.
        progress: show progress on rank 0: a rich progress bar on a terminal, plain complete
            lines every ``run.log_every`` steps otherwise (a cluster's log file), and each
            evaluation's metrics when they are computed.
        find_unused_parameters: DDP's option, for models whose steps skip parameters.
        format_metrics: ``metrics -> text`` for the printed evaluation lines (default
            ``name value`` pairs).
        resume_hint: the command that resumes this run, printed when a signal stops it.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        recipe: Recipe,
        run_dir: str | Path,
        *,
        collate_fn: Callable[[list[Any]], Batch] | None = None,
        prepare_batch: Callable[[Batch, StepContext], Batch] | None = None,
        evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
        best_metric: str | None = None,
        best_mode: Literal["max", "min"] = "max",
        on_best: Callable[[nn.Module, dict[str, float]], None] | None = None,
        param_groups: list[dict[str, Any]] | None = None,
        progress: bool = True,
        find_unused_parameters: bool = False,
        console: Console | None = None,
        format_metrics: Callable[[dict[str, float]], str] | None = None,
        resume_hint: str | None = None,
    ) -> None:
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.dist = D.init_distributed(recipe.run.device)
        self.device = self.dist.device
        self.model = model.to(self.device)
        self.dataset = dataset
        self.collate_fn = collate_fn
        self.prepare_batch = prepare_batch
        self.evaluate = evaluate
        self.best_metric = best_metric
        self.best_mode = best_mode
        self.on_best = on_best
        self.progress = progress and self.dist.is_main
        self.console = console or plain_console(stderr=True)
        self.find_unused_parameters = find_unused_parameters
        self.format_metrics = format_metrics
        self.resume_hint = resume_hint
        self.loggers: list[MetricLogger] = []

        global_batch = recipe.data.batch_size
        self.accumulate = recipe.optim.accumulate_steps
        if self.accumulate < 1:
            raise ValueError(f"optim.accumulate_steps must be >= 1, got {self.accumulate}")
        if global_batch % (self.dist.world_size * self.accumulate):
            raise ValueError(
                f"data.batch_size={global_batch} is the global batch and must divide evenly "
                f"over {self.dist.world_size} processes x optim.accumulate_steps="
                f"{self.accumulate} micro-batches"
            )
        self.batch_size = global_batch // self.dist.world_size
        self.sampler = EpochBatchSampler(
            len(dataset),
            self.batch_size,
            self.dist.rank,
            self.dist.world_size,
            recipe.run.seed,
            with_epoch=bool(getattr(dataset, "fresh_each_epoch", False)),
        )
        self.plan = StepPlan.from_config(recipe.schedule, len(self.sampler))
        groups = param_groups or default_param_groups(self.model, recipe.optim.weight_decay)
        self.optimizer = build_optimizer(
            groups, recipe.optim.name, recipe.optim.lr, recipe.optim.betas, self.device
        )
        self.autocast_dtype = self._autocast_dtype()
        if self.device.type == "cuda":
            # fp32 matmuls outside autocast (the teacher on the fly, kNN distances) on TF32
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.best: dict[str, Any] | None = None
        # The newest checkpoint on disk (resumed from or written): named when the run diverges.
        self._last_checkpoint: Path | None = None
        # Wall time of earlier sessions (from the checkpoint) and when this session started.
        self._wall_before = 0.0
        self._session_start = time.perf_counter()

    # -- setup ------------------------------------------------------------------------------
    def _autocast_dtype(self) -> torch.dtype | None:
        precision = self.recipe.run.precision
        if precision == "fp32":
            return None
        if precision == "bf16":
            return torch.bfloat16
        if self.device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None  # auto on CPU: fp32 (bf16 matmuls are slow on most CPUs)

    def _loader(self) -> DataLoader:
        workers = loader_workers(self.recipe.data.num_workers, self.device)
        if workers < self.recipe.data.num_workers and self.dist.is_main:
            self.console.print(styled(
                "[yellow]note:[/] data.num_workers={asked} on a CPU-only run with {cores} cores: "
                "using {workers} loader workers", asked=self.recipe.data.num_workers,
                cores=usable_cores(), workers=workers,
            ))
        return DataLoader(
            self.dataset,
            batch_sampler=self.sampler,
            collate_fn=self.collate_fn,
            num_workers=workers,
            persistent_workers=workers > 0,
            worker_init_fn=_ignore_stop_signals if workers > 0 else None,
            pin_memory=self.device.type == "cuda",
            # A private generator: creating loader iterators never touches the global RNG.
            generator=torch.Generator().manual_seed(self.recipe.run.seed),
        )

    def _wrapped(self) -> nn.Module:
        """The module a step calls: the task's step, its network compiled in place when the
        recipe says so, inside DDP under ``torchrun``.

        Only the network (the step's ``model``) is compiled, not the step around it, which may
        call Python code such as scipy's matcher; ``nn.Module.compile`` keeps the parameter
        names, so checkpoints do not change.
        """
        module: nn.Module = self.model
        run = self.recipe.run
        if run.compile:
            target = getattr(module, "model", module)
            if not getattr(target, "_cd2p_compiled", False):
                target.compile(mode=None if run.compile_mode == "default" else run.compile_mode)
                target._cd2p_compiled = True
        if self.dist.distributed:
            module = nn.parallel.DistributedDataParallel(
                module,
                device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=self.find_unused_parameters,
                # gradients live in DDP's buckets (no extra copy); a graph whose every
                # parameter takes part in every step can be declared static
                gradient_as_bucket_view=True,
                static_graph=not self.find_unused_parameters,
            )
        return module

    # -- checkpoints ------------------------------------------------------------------------
    def _trainer_state(self) -> dict[str, Any]:
        return {
            "best": self.best,
            "total_steps": self.plan.total_steps,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "wall_seconds": self._wall_seconds(),
        }

    def _wall_seconds(self) -> float:
        return self._wall_before + time.perf_counter() - self._session_start

    def _save(self, step: int, pending_loss: torch.Tensor | None = None) -> Path | None:
        """Checkpoint at ``step`` (rank 0 writes; every rank takes part).

        ``pending_loss``: the summed loss of the steps since the last logged one, checked
        with the weights and the optimiser state before anything is written.
        """
        self._check_finite(step, pending_loss, optimizer=True)
        local = capture_rng_state()
        # Gather every rank's RNG state on rank 0 as JSON-ready lists (no pickling).
        payload = {
            "tensors": {k: [str(v.dtype), v.tolist()] for k, v in local[0].items()},
            "scalars": local[1],
        }
        gathered = D.all_gather_json(payload, self._collective_device())
        path = None
        if self.dist.is_main:
            states = [
                (
                    {
                        k: torch.tensor(values, dtype=getattr(torch, dtype.split(".")[-1]))
                        for k, (dtype, values) in item["tensors"].items()
                    },
                    item["scalars"],
                )
                for item in gathered
            ]
            path = save_checkpoint(
                self.run_dir,
                step=step,
                epoch=step // self.plan.steps_per_epoch,
                model=self.model,
                optimizer=self.optimizer,
                recipe=self.recipe,
                rng_states=states,
                trainer_state=self._trainer_state(),
                keep=self.recipe.run.keep_checkpoints,
            )
        D.barrier()
        self._last_checkpoint = self.run_dir / CHECKPOINTS / f"step-{step:08d}"
        return path

    def _collective_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    def _warn(self, message: str) -> None:
        """One warning line on rank 0 (never wrapped: a log file stays greppable)."""
        if self.dist.is_main:
            # escaped: a path or a parser's message may hold [brackets]
            self.console.print(styled("[bold yellow]warning:[/] {message}", message=message),
                               soft_wrap=True, highlight=False)  # fmt: skip

    def _resume_path(self) -> Path | None:
        """The checkpoint to resume from: chosen (and verified) by rank 0, for every rank."""
        choice: dict[str, Any] = {}
        if self.dist.is_main:
            try:
                path = latest_checkpoint(self.run_dir, warn=self._warn)
                choice = {"name": None if path is None else path.name}
            except NoIntactCheckpoint as exc:
                if not self.dist.distributed:
                    raise
                choice = {"error": str(exc)}
        choice = D.all_gather_json(choice, self._collective_device())[0]
        if "error" in choice:
            raise NoIntactCheckpoint(choice["error"])
        return None if choice["name"] is None else self.run_dir / CHECKPOINTS / choice["name"]

    def _resume(self) -> int:
        path = self._resume_path()
        if path is None:
            if self.dist.is_main:
                self.console.print(styled(
                    "[yellow]{run} has no checkpoint yet: starting at step 0", run=self.run_dir
                ))
            return 0
        ckpt = load_checkpoint(path, self.model, self.optimizer, rank=self.dist.rank)
        if ckpt.world_size != self.dist.world_size and self.dist.is_main:
            self.console.print(styled(
                "[yellow]checkpoint written by {saved} processes, resumed by {now}: training "
                "continues but not bit-exactly", saved=ckpt.world_size, now=self.dist.world_size,
            ))
        state = ckpt.trainer_state
        saved_total = state.get("total_steps", self.plan.total_steps)
        # The batches of an epoch depend on the data: a different count means other data.
        saved_per_epoch = state.get("steps_per_epoch")
        if saved_per_epoch is None and saved_total != self.plan.total_steps:
            saved_per_epoch = -1  # an older checkpoint: only an unchanged length is safe
        if saved_per_epoch is not None and saved_per_epoch != self.plan.steps_per_epoch:
            raise ValueError(
                f"{path} belongs to a run of {saved_total} steps ({saved_per_epoch} per epoch), "
                f"but the recipe and data now give {self.plan.total_steps} "
                f"({self.plan.steps_per_epoch} per epoch): the data or the batch size changed"
            )
        if ckpt.step > self.plan.total_steps:
            raise ValueError(
                f"{path} is at step {ckpt.step}, beyond the {self.plan.total_steps} steps the "
                "recipe now asks for: a run cannot be shortened below what it has done"
            )
        if saved_total != self.plan.total_steps and self.dist.is_main:
            self.console.print(styled(
                "[yellow]extending the run:[/] {saved} -> {total} steps; the learning rate "
                "follows the cosine schedule of {total} steps from step {step} on",
                saved=saved_total, total=self.plan.total_steps, step=ckpt.step,
            ))
        self.best = state.get("best")
        self._wall_before = float(state.get("wall_seconds") or 0.0)
        self._last_checkpoint = path
        return ckpt.step

    # -- evaluation -------------------------------------------------------------------------
    def _run_evaluation(self, step: int, log: MetricsLog | None) -> None:
        # An evaluation waits for the device anyway; a diverged model is neither evaluated
        # nor exported as the best.
        self._check_finite(step)
        D.broadcast_buffers(self.model)  # every rank evaluates the same model
        self.model.eval()
        try:
            with torch.no_grad():
                metrics = self.evaluate(self.model)
        finally:
            self.model.train()
        epoch = math.ceil(step / self.plan.steps_per_epoch)
        record = {"kind": "eval", "step": step, "epoch": epoch, **metrics}
        if log is not None:
            log.write(record)
        for logger in self.loggers:
            logger.log(record)
        if self.progress:
            text = (
                self.format_metrics(metrics)
                if self.format_metrics is not None
                else "  ".join(f"{k} {v:.4g}" for k, v in metrics.items() if _is_number(v))
            )
            self.console.print(f"eval  step {step} (epoch {epoch}): {text}", soft_wrap=True)
        if self.best_metric is None:
            return
        if self.best_metric not in metrics:
            raise KeyError(f"evaluate() returned {sorted(metrics)}, not {self.best_metric!r}")
        value = float(metrics[self.best_metric])
        # A best value read back from a checkpoint may be null (it was NaN): anything beats it;
        # a NaN value beats nothing.
        previous = None if self.best is None else self.best.get("value")
        if not _is_number(previous) or not math.isfinite(previous):
            previous = None
        better = math.isfinite(value) and (
            previous is None or (value > previous if self.best_mode == "max" else value < previous)
        )
        if better:
            self.best = {"metric": self.best_metric, "value": value, "step": step, **metrics}
            if self.on_best is not None and self.dist.is_main:
                self.on_best(self.model, metrics)

    # -- the loop ---------------------------------------------------------------------------
    def fit(self, resume: bool = False, stop_after: int | None = None) -> RunResult:
        """Train to the end of the schedule (or until step ``stop_after``, checkpointing
        there, as a job with a wall-time limit would) and return the outcome.

        With ``resume``, continue from the run directory's latest checkpoint; a recipe whose
        schedule is now longer (or shorter, but not below the checkpoint) extends the run.
        SIGINT / SIGTERM finish the current step, write a checkpoint and raise
        :class:`TrainingInterrupted`.
        """
        run = self.recipe.run
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._session_start = time.perf_counter()
        if self.dist.is_main:
            # What a run killed mid-write left (a half checkpoint, its trash, a half
            # metrics.jsonl rewrite); those of a live process are kept.
            for directory in (self.run_dir, self.run_dir / CHECKPOINTS):
                remove_stale_temporaries(directory)
        start = self._resume() if resume else 0
        if start == 0:
            seed_everything(run.seed + self.dist.rank)
        log = None
        if self.dist.is_main:
            save_recipe(self.recipe, self.run_dir / "recipe.yaml")
            truncate_metrics(self.run_dir, start)
            self.loggers = open_loggers(run.loggers, self.run_dir, to_dict(self.recipe), start)
            log = MetricsLog(self.run_dir)
        D.barrier()
        try:
            with _StopSignals() as stop:
                return self._fit(start, resume, stop_after, log, stop)
        finally:
            if log is not None:
                log.close()
            for logger in self.loggers:
                logger.close()
            self.loggers = []

    def _fit(
        self,
        start: int,
        resume: bool,
        stop_after: int | None,
        log: MetricsLog | None,
        stop: _StopSignals,
    ) -> RunResult:
        run = self.recipe.run
        total = self.plan.total_steps
        end = total if stop_after is None else min(total, stop_after)
        module = self._wrapped()
        self.model.train()
        loader = self._loader()
        grad_params = [p for p in self.model.parameters() if p.requires_grad]

        last: dict[str, float] = {}
        step = start
        window: dict[str, torch.Tensor] = {}
        window_steps, data_time = 0, 0.0
        window_start = fit_start = time.perf_counter()
        saved_at = None
        plain = self.progress and not self.console.is_terminal
        progress = self._progress_bar() if self.progress and not plain else None
        task = (
            progress.add_task("train", total=total, completed=start, info="") if progress else None
        )
        with progress or contextlib.nullcontext():
            while step < end:
                epoch = step // self.plan.steps_per_epoch
                self.sampler.set_epoch(epoch, step % self.plan.steps_per_epoch)
                fetch_start = time.perf_counter()
                batches = iter(loader)
                while True:
                    try:
                        batch = next(batches)
                    except StopIteration:
                        break
                    except Exception:
                        if stop.received is None:
                            raise
                        break  # a worker hit by the signal: stop at the last complete step
                    data_time += time.perf_counter() - fetch_start
                    out = self._step(module, batch, step, epoch, grad_params)
                    for key, value in out.items():
                        window[key] = window.get(key, 0.0) + value
                    window_steps += 1
                    step += 1
                    at_epoch_end = step % self.plan.steps_per_epoch == 0
                    if step % run.log_every == 0 or step == end:
                        last = self._log(log, window, window_steps, window_start, data_time, step)
                        window, window_steps, data_time = {}, 0, 0.0
                        window_start = time.perf_counter()
                        if progress is not None:
                            progress.update(task, info=self._progress_info(last))
                        if plain:
                            elapsed = time.perf_counter() - fit_start
                            line = self._progress_line(last, step - start, elapsed)
                            self.console.print(line, soft_wrap=True, highlight=False)
                    if progress is not None:
                        progress.update(task, completed=step)
                    if self.evaluate is not None and (
                        step == total
                        or (
                            at_epoch_end
                            and (step // self.plan.steps_per_epoch) % run.eval_every == 0
                        )
                    ):
                        self._run_evaluation(step, log)
                    if step % run.checkpoint_every == 0 or step == end:
                        saved_at = self._save(step, window.get("loss"))
                    if step >= end or self._stop_requested(stop):
                        break
                    fetch_start = time.perf_counter()
                if self._stop_requested(stop) and step < end:
                    self._interrupt(step, saved_at, stop, log, window, window_steps,
                                    window_start, data_time)  # fmt: skip

        D.broadcast_buffers(self.model)
        hashes = D.all_gather_json(weights_sha256(self.model), self._collective_device())
        if log is not None and step == total:
            log.write({"kind": "final", "step": step, "weights_sha256": hashes})
        components = {k: v for k, v in last.items() if k.startswith("loss_")}
        return RunResult(
            run_dir=self.run_dir,
            step=step,
            total_steps=total,
            epoch=math.ceil(step / self.plan.steps_per_epoch),
            completed=step == total,
            final_loss=last.get("loss"),
            final_components=components,
            best=self.best,
            weights_sha256=hashes,
            checkpoint=saved_at,
            resumed_from=start if resume else None,
            wall_seconds=self._wall_seconds(),
        )

    def _stop_requested(self, stop: _StopSignals) -> bool:
        """Whether any rank got SIGINT / SIGTERM (every rank must stop at the same step)."""
        flag = stop.received is not None
        if not self.dist.distributed:
            return flag
        value = torch.tensor([float(flag)], device=self._collective_device())
        return bool(D.all_reduce_sum(value).item() > 0)

    def _interrupt(
        self,
        step: int,
        saved_at: Path | None,
        stop: _StopSignals,
        log: MetricsLog | None,
        window: dict[str, torch.Tensor],
        window_steps: int,
        window_start: float,
        data_time: float,
    ) -> None:
        """Checkpoint at ``step`` (unless just done), say how to resume, raise."""
        if window_steps:  # the steps since the last logged one are logged too
            self._log(log, window, window_steps, window_start, data_time, step)
        if saved_at is None or not saved_at.name.endswith(f"{step:08d}"):
            saved_at = self._save(step)
        name = stop.received or "SIGTERM"  # another rank's signal
        if self.dist.is_main:
            hint = self.resume_hint or "--resume " + str(self.run_dir)
            if self.dist.distributed and hint.startswith("cd2p "):
                hint = f"torchrun <the same torchrun options> -m {hint}"
            self.console.print(styled(
                "[bold yellow]{name}:[/] stopped at step {step} of {total}; checkpoint {saved}. "
                "Continue with: [bold]{hint}", name=name, step=step, total=self.plan.total_steps,
                saved=saved_at, hint=hint,
            ), soft_wrap=True)
        raise TrainingInterrupted(self.run_dir, step, self.plan.total_steps, saved_at, name)

    def _step(
        self, module: nn.Module, batch: Batch, step: int, epoch: int, params: list[nn.Parameter]
    ) -> dict[str, torch.Tensor]:
        """One optimiser step (over ``optim.accumulate_steps`` micro-batches); returns the
        detached loss (and components, grad norm)."""
        batch = move_to(batch, self.device)
        if self.prepare_batch is not None:
            ctx = StepContext(
                step=step,
                epoch=epoch,
                rank=self.dist.rank,
                device=self.device,
                generator=step_generator(
                    self.recipe.run.seed, step, self.dist.rank, device=self.device
                ),
            )
            with torch.no_grad():
                batch = self.prepare_batch(batch, ctx)
        set_lr(
            self.optimizer,
            lr_at(
                step,
                self.recipe.optim.lr,
                self.recipe.schedule.min_lr,
                self.plan.total_steps,
                self.plan.warmup_steps,
            ),
        )
        autocast = (
            torch.autocast(self.device.type, dtype=self.autocast_dtype)
            if self.autocast_dtype is not None
            else contextlib.nullcontext()
        )
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = split_batch(batch, self.accumulate)
        logged: dict[str, torch.Tensor] = {}
        for i, micro in enumerate(micro_batches):
            # DDP all-reduces the gradients of the last micro-batch only (they accumulate).
            sync = i == len(micro_batches) - 1 or not isinstance(
                module, nn.parallel.DistributedDataParallel
            )
            with (contextlib.nullcontext() if sync else module.no_sync()), autocast:
                out = module(micro)
            if "loss" not in out:
                raise KeyError(
                    f"{type(self.model).__name__}.forward must return a dict with 'loss'"
                )
            # Equal micro-batches: the mean of their mean losses is the batch's mean loss.
            (out["loss"] / self.accumulate).backward()
            for key, value in out.items():
                if key == "loss" or key.startswith("loss_"):
                    part = value.detach().float() / self.accumulate
                    logged[key] = logged[key] + part if key in logged else part
        if self.recipe.optim.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.grad_clip)
            logged["grad_norm"] = norm.detach().float()
        self.optimizer.step()
        return logged

    def _check_finite(
        self, step: int, loss: float | torch.Tensor | None = None, optimizer: bool = False
    ) -> None:
        """Raise :class:`TrainingDiverged` when the loss, the weights or (``optimizer``) the
        optimiser state are not finite, on every rank alike.

        Called only where the trainer waits for the device anyway (a logged step, an
        evaluation, a checkpoint), never every step: one pass over the weights and one
        synchronisation (two under DDP, to agree on the answer).
        """
        problem = None
        if loss is not None:
            value = float(loss)
            if not math.isfinite(value):
                problem = f"the loss is {value}"
        if problem is None:
            bad = first_nonfinite(self.model.state_dict().items())
            if bad is not None:
                problem = f"the weights are not finite ({bad})"
        if problem is None and optimizer:
            bad = first_nonfinite(optimizer_tensors(self.optimizer))
            if bad is not None:
                problem = f"the optimiser state is not finite ({bad})"
        if self.dist.distributed:
            flag = torch.tensor([float(problem is not None)], device=self._collective_device())
            if D.all_reduce_sum(flag).item() > 0 and problem is None:
                problem = "the loss or the weights of another process are not finite"
        if problem is None:
            return
        optim = self.recipe.optim
        clip = (
            f"a smaller optim.grad_clip (now {optim.grad_clip})"
            if optim.grad_clip is not None
            else "optim.grad_clip (e.g. 1.0)"
        )
        hint = (
            f"start a new run with a lower optim.lr (now {optim.lr:g}) or {clip}; resuming "
            "this one would repeat the same steps"
        )
        raise TrainingDiverged(self.run_dir, step, problem, self._last_checkpoint, hint)

    def _log(
        self,
        log: MetricsLog | None,
        window: dict[str, torch.Tensor],
        steps: int,
        started: float,
        data_time: float,
        step: int,
    ) -> dict[str, float]:
        """Average the window over steps and ranks, write a ``train`` record (rank 0)."""
        keys = sorted(window)
        values = torch.stack([window[k] for k in keys]).to(self._collective_device())
        values = D.all_reduce_sum(values) / (steps * self.dist.world_size)
        record = dict(zip(keys, values.tolist(), strict=True))
        self._check_finite(step, record["loss"])  # .tolist() has waited for the device
        elapsed = max(time.perf_counter() - started, 1e-9)
        record = {
            "kind": "train",
            "step": step,
            "epoch": round(step / self.plan.steps_per_epoch, 4),
            **{k: record[k] for k in ["loss"] + [k for k in keys if k != "loss"]},
            "lr": self.optimizer.param_groups[0]["lr"]
            / self.optimizer.param_groups[0].get("lr_scale", 1.0),
            "samples_per_s": steps * self.batch_size * self.dist.world_size / elapsed,
            "data_fraction": data_time / elapsed,
            "peak_memory_mb": peak_memory_mb(self.device),
        }
        if log is not None:
            log.write(record)
        for logger in self.loggers:
            logger.log(record)
        return record

    def _progress_bar(self) -> Progress | None:
        if not self.progress:
            return None
        return Progress(
            TextColumn("[bold cyan]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=self.console,
        )

    def _progress_line(self, record: dict[str, float], steps_done: int, elapsed: float) -> str:
        """One complete plain line for a log file: step, epoch, losses, lr, speed, ETA."""
        total = self.plan.total_steps
        step = int(record["step"])
        remaining = (total - step) * elapsed / max(steps_done, 1)
        eta = time.strftime("%H:%M:%S", time.gmtime(remaining))
        if remaining >= 86400:
            eta = f"{int(remaining // 86400)}d {eta}"
        return (
            f"train step {step}/{total} ({100 * step / total:.1f} %) epoch "
            f"{record['epoch']:.2f} | {self._progress_info(record)} | "
            f"data {100 * record['data_fraction']:.0f} % | eta {eta}"
        )

    @staticmethod
    def _progress_info(record: dict[str, float]) -> str:
        parts = [f"loss {record['loss']:.4g}"]
        parts += [f"{k[5:]} {v:.4g}" for k, v in record.items() if k.startswith("loss_")]
        parts.append(f"lr {record['lr']:.2e}")
        parts.append(f"{record['samples_per_s']:.0f} samples/s")
        parts.append(f"{record['peak_memory_mb']:.0f} MB")
        return " · ".join(parts)
