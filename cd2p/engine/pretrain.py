"""Pre-training (``cd2p pretrain``): the distillation objectives on prepared RGB/point pairs.

``run_pretrain`` builds :class:`~cd2p.models.distill.Cd2pPretrainModel` from the recipe, a
:class:`~cd2p.data.pairs.PairDataset` with the teacher targets stored by
``cd2p prepare teacher`` (or the JPEGs, when ``pretrain.targets: on-the-fly`` runs the frozen
teacher inside each step), trains it with the shared :class:`~cd2p.engine.trainer.Trainer`
and exports the student as a Hub-format backbone in ``RUN/backbone/`` and, for the
distillation objectives, the whole student (backbone, concepts, alignment heads) in
``RUN/student/``. :func:`export_run_student` exports the student of an existing run from its
latest checkpoint.

Run directory::

    RUN/recipe.yaml      the recipe as run          RUN/metrics.jsonl   training curves
    RUN/run.json         data, teacher, recipe name RUN/checkpoints/    resumable state
    RUN/backbone/        Cd2pBackbone.from_pretrained("RUN/backbone")
    RUN/student/         Cd2pStudent.from_pretrained("RUN/student") (not for `mae`)
    RUN/summary.json     final loss, steps, teacher, export paths
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch import nn

from cd2p._atomic import atomic_directory, atomic_write_json
from cd2p._text import plain_console, styled
from cd2p.config import Recipe, apply_overrides, load_recipe, resume_changes
from cd2p.engine import distributed as D
from cd2p.engine.augment import random_subsample, scale_and_translate
from cd2p.engine.trainer import RunResult, StepContext, Trainer, check_run_dir, seed_everything
from cd2p.provenance import check_same_data, data_fingerprint, provenance

RUN_INFO = "run.json"
SUMMARY = "summary.json"
BACKBONE_DIR = "backbone"
STUDENT_DIR = "student"

# The stored teacher targets each objective learns from, main target first (none for mae).
TARGETS_OF_OBJECTIVE: dict[str, tuple[str, ...]] = {
    "distill": ("prefix",),
    "distill-no-concept": ("prefix",),
    "distill-clip": ("clip",),
    "distill+clip": ("prefix", "clip"),
    "mae": (),
    "mae+distill": ("prefix",),
}


class PretrainStep(nn.Module):
    """Adapts :class:`Cd2pPretrainModel` to the trainer: ``forward(batch)`` with
    ``batch["points"] (B, N, 3)``, ``batch["target"] (B, T, C)`` (absent for ``mae``) and
    ``batch["target_clip"] (B, 1, 512)`` (``distill+clip``'s second target)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        return self.model(
            batch["points"], batch.get("target"), clip_target=batch.get("target_clip")
        )


class PairCollate:
    """Pair samples -> batch: ``points (B, P, 3)``, ``target (B, T, C)`` when stored, and,
    for on-the-fly targets, ``pixels (B, 3, 224, 224)``: the JPEGs decoded and CLIP-preprocessed
    here, in the DataLoader workers, so the training step only runs the teacher's forward."""

    def __init__(self, decode_images: bool = False, image_size: int = 224) -> None:
        self.decode_images = decode_images
        self.image_size = image_size
        self._transform: Any = None

    def __call__(self, items: Any) -> dict[str, Any]:
        from cd2p.data.pairs import PairBatch

        # Targets stay as stored (float16) until the device: half the bytes to move.
        if isinstance(items, PairBatch):  # read at once by PairDataset.__getitems__
            batch: dict[str, Any] = {"points": items.points, **items.targets}
        else:
            batch = {"points": torch.stack([item["points"] for item in items])}
            for key in items[0]:
                if key == "target" or key.startswith("target_"):
                    batch[key] = torch.stack([item[key] for item in items])
        if self.decode_images:
            from cd2p.models.teacher import clip_transform, decode_image

            if self._transform is None:
                self._transform = clip_transform(self.image_size)
            batch["pixels"] = torch.stack(
                [self._transform(decode_image(item["image"])) for item in items]
            )
        return batch


class PrepareBatch:
    """The per-step, on-device part of the input pipeline (run under ``no_grad``):
    random subsampling to ``data.num_points``, Point-MAE scale-and-translate, and the teacher's
    forward when targets are computed on the fly. Randomness comes from the step's generator."""

    def __init__(self, recipe: Recipe, teacher: nn.Module | None = None) -> None:
        self.data = recipe.data
        self.teacher = teacher
        self.targets = TARGETS_OF_OBJECTIVE[recipe.pretrain.objective]

    def __call__(self, batch: dict[str, Any], ctx: StepContext) -> dict[str, Any]:
        points = random_subsample(batch["points"], self.data.num_points, ctx.generator)
        batch["points"] = scale_and_translate(
            points, ctx.generator, self.data.scale_low, self.data.scale_high, self.data.translate
        )
        if self.teacher is not None:
            # Every target of the objective from one CLIP pass.
            computed = self.teacher.compute(batch.pop("pixels"), self.targets)
            for position, name in enumerate(self.targets):
                batch["target" if position == 0 else f"target_{name}"] = computed[name]
        return batch


@dataclass
class PretrainResult:
    """The outcome of :func:`run_pretrain`."""

    run: RunResult
    backbone_dir: Path | None
    student_dir: Path | None
    pairs: int
    teacher: str
    random_teacher: bool
    model: nn.Module  # the trained Cd2pPretrainModel (on the training device)


def build_pretrain_model(recipe: Recipe) -> nn.Module:
    """The recipe's :class:`Cd2pPretrainModel` (seed the RNG first for reproducible init)."""
    from cd2p.models.distill import Cd2pPretrainModel

    cfg = recipe.pretrain
    return Cd2pPretrainModel(
        backbone_config=recipe.model.backbone_kwargs(),
        objective=cfg.objective,
        num_concepts=cfg.num_concepts,
        mask_ratio=cfg.mask_ratio,
        decoder_depth=cfg.decoder_depth,
        # Point-MAE's decoder has the encoder's width and head count.
        decoder_heads=recipe.model.num_heads,
        clip_weight=cfg.clip_weight,
    )


def _stored_teacher(dataset: Any) -> tuple[str, bool]:
    """Description and randomness of the teacher that wrote a dataset's stored targets (of
    its main target; the targets of each name must come from one teacher, and a second
    target (``clip``) must be as random as the first)."""
    from cd2p.data.teacher_targets import read_targets_header

    found: list[tuple[str, bool]] = []
    for name in dataset.targets:
        teachers, random_flags = set(), set()
        for path in dataset.paths_of_target[name]:
            header = read_targets_header(path)
            if header is None:
                raise ValueError(
                    f"{path} is not a readable targets file; rerun `cd2p prepare teacher`"
                )
            teachers.add(header[2].get("teacher", "unknown"))
            random_flags.add(header[2].get("random_teacher", "false") == "true")
        if len(teachers) > 1:
            raise ValueError(
                f"the pairs' stored {name!r} targets come from different teachers "
                f"({sorted(teachers)}); recompute them with one teacher "
                "(`cd2p prepare teacher --overwrite`)"
            )
        found.append((teachers.pop() if teachers else "none", any(random_flags)))
    if not found:
        return "none", False
    if len({randomness for _, randomness in found}) > 1:
        raise ValueError(
            f"the pairs' {' and '.join(dataset.targets)} targets mix a RANDOM teacher and a "
            "real one; recompute them together with `cd2p prepare teacher --target "
            f"{','.join(dataset.targets)} --overwrite`"
        )
    return found[0]


def _open_pairs(recipe: Recipe, data: Sequence[Path]) -> Any:
    from cd2p.data.pairs import PairDataset

    targets = TARGETS_OF_OBJECTIVE[recipe.pretrain.objective]
    on_the_fly = recipe.pretrain.targets == "on-the-fly" and bool(targets)
    try:
        dataset = PairDataset(
            list(data),
            target=None if on_the_fly else (targets or None),
            with_image=on_the_fly,
            in_memory=recipe.data.in_memory and not on_the_fly,
        )
    except FileNotFoundError as exc:
        if "teacher targets" not in str(exc):
            raise
        roots = " ".join(str(p) for p in data)
        names = ",".join(targets)
        raise FileNotFoundError(
            f"{exc}. Objective {recipe.pretrain.objective!r} learns from the {names!r} teacher "
            f"targets: compute them once with `cd2p prepare teacher {roots} --target {names}`, "
            "or set pretrain.targets=on-the-fly to run the teacher during training"
        ) from None
    if len(dataset) == 0:
        raise ValueError(f"no pairs found under {', '.join(map(str, data))}")
    available = dataset[0]["points"].shape[0]
    if available < recipe.data.num_points:
        raise ValueError(
            f"the pairs hold {available} points per cloud but data.num_points is "
            f"{recipe.data.num_points}: prepare them with --points {recipe.data.num_points} "
            f"or lower data.num_points"
        )
    return dataset


def _build_teacher(recipe: Recipe, device: torch.device) -> nn.Module:
    from cd2p.models.teacher import Teacher

    targets = TARGETS_OF_OBJECTIVE[recipe.pretrain.objective]
    target = "prefix" if "prefix" in targets else "clip"  # the prefix teacher also gives clip
    cfg = recipe.pretrain
    if cfg.random_teacher:
        return Teacher.random(target, seed=recipe.run.seed, device=device)
    return Teacher.from_pretrained(
        target, clip_weights=cfg.clip_weights, clipcap_weights=cfg.clipcap_weights, device=device
    )


def export_backbone(
    model: nn.Module,
    out_dir: Path,
    training: dict[str, Any],
    provenance: dict[str, Any] | None = None,
) -> Path:
    """Save the student as ``out_dir`` (a Hub-format ``Cd2pBackbone``) atomically."""
    backbone = model.export_backbone()
    card = {"training": training, "provenance": provenance}
    with atomic_directory(out_dir) as tmp:
        backbone.save_pretrained(tmp, model_card_kwargs=card)
    return out_dir


def pairs_voxel_size(data: Sequence[str | Path]) -> float | None:
    """The voxel grid (``--voxel-size``) the pairs were prepared with, from their
    ``prepare_config.json``; ``None`` when no part records one or the parts differ."""
    sizes = set()
    for root in data:
        path = Path(root) / "prepare_config.json"
        if not path.is_file():
            return None
        try:
            value = json.loads(path.read_text()).get("voxel_size")
        except json.JSONDecodeError:
            return None
        sizes.add(value)
    if len(sizes) != 1:
        return None
    value = sizes.pop()
    return float(value) if isinstance(value, int | float) else None


def export_student(
    model: nn.Module, out_dir: Path, recipe: Recipe, data: Sequence[str | Path],
    training: dict[str, Any], provenance: dict[str, Any] | None = None,
) -> Path:
    """Save the whole student of ``model`` (a ``Cd2pPretrainModel``) as ``out_dir`` (a
    Hub-format ``Cd2pStudent``) atomically, with the point preprocessing of pre-training:
    ``data.num_points`` points and the pairs' voxel grid."""
    student = model.export_student(recipe.data.num_points, pairs_voxel_size(data))
    with atomic_directory(out_dir) as tmp:
        student.save_pretrained(tmp, model_card_kwargs={"training": training,
                                                        "provenance": provenance})
    return out_dir


def _training_facts(
    recipe: Recipe, recipe_name: str | None, data: Sequence[Path], pairs: int, step: int,
    epoch: int, final_loss: float | None, teacher_desc: str, teacher_random: bool,
) -> dict[str, Any]:
    """What the exported models' cards say about the run."""
    return {
        "recipe": recipe_name or recipe.description or "custom",
        "objective": recipe.pretrain.objective,
        "data": ", ".join(str(p) for p in data) + f" ({pairs} pairs)",
        "steps": f"{step} ({epoch} epochs, batch {recipe.data.batch_size})",
        "final loss": f"{final_loss:.5g}" if final_loss is not None else "n/a",
        "teacher": teacher_desc,
        "random teacher": "yes (NOT CLIP: a pipeline test)" if teacher_random else "no",
    }


def export_run_student(
    run_dir: str | Path, out: str | Path | None = None, checkpoint: str | Path | None = None
) -> Path:
    """Export the whole student of an existing pre-training run from a checkpoint (default:
    its latest) to ``out`` (default ``RUN/student``); returns ``out``.

    For runs made before cd2p exported the student, or to take an earlier checkpoint. The
    model card records the checkpoint's step and the run's data and teacher.
    """
    from cd2p.engine.checkpoint import latest_checkpoint, load_checkpoint

    run_dir = Path(run_dir)
    recipe_file, info_file = run_dir / "recipe.yaml", run_dir / RUN_INFO
    if not recipe_file.is_file() or not info_file.is_file():
        raise FileNotFoundError(f"{run_dir} is not a cd2p pretrain run (no recipe.yaml/run.json)")
    recipe = load_recipe(recipe_file)
    if recipe.task != "pretrain":
        raise ValueError(f"{run_dir} is a {recipe.task!r} run, not a pre-training run")
    if not TARGETS_OF_OBJECTIVE[recipe.pretrain.objective]:
        raise ValueError(
            f"{run_dir} was trained with objective {recipe.pretrain.objective!r}, which has no "
            "student to export (only its backbone, RUN/backbone)"
        )
    checkpoint = Path(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint yet (checkpoints/latest)")
    info = json.loads(info_file.read_text())
    model = build_pretrain_model(recipe)
    state = load_checkpoint(checkpoint, PretrainStep(model), restore_rng=False)
    model.eval()
    data = [Path(p) for p in info.get("data", [])]
    training = _training_facts(
        recipe, info.get("recipe_name"), data, int(info.get("pairs", 0)), state.step,
        state.epoch, None, str(info.get("teacher", "unknown")), bool(info.get("random_teacher")),
    )  # fmt: skip
    training["exported from"] = f"checkpoint {checkpoint.name}"
    out_dir = Path(out) if out is not None else run_dir / STUDENT_DIR
    return export_student(model, out_dir, recipe, data, training)


def run_pretrain(
    recipe: Recipe | None,
    data_paths: Sequence[str | Path] | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    recipe_name: str | None = None,
    teacher: nn.Module | None = None,
    stop_after: int | None = None,
    console: Console | None = None,
    overrides: Sequence[str] = (),
) -> PretrainResult:
    """Pre-train a student on prepared pairs and export it to ``out_dir/backbone``.

    Args:
        recipe: the recipe; with ``resume`` it may be ``None`` (``RUN/recipe.yaml`` is used)
            and otherwise must equal the saved one.
        data_paths: prepared pairs directories (``cd2p prepare scannet`` outputs, with targets
            from ``cd2p prepare teacher``); with ``resume`` ``None`` reuses the saved ones.
        out_dir: the run directory; must be new or empty unless ``resume``.
        resume: continue the run in ``out_dir`` from its latest checkpoint.
        progress: show a progress bar (rank 0).
        recipe_name: how the recipe is named in ``run.json`` and the model card.
        teacher: a ready teacher for on-the-fly targets (default: built from the recipe).
        stop_after: stop (with a checkpoint) after this step, e.g. to split a run into jobs.
        overrides: with ``resume``, changes to the saved recipe that keep the run consistent
            (``schedule.epochs=N`` extends it; see :func:`cd2p.config.resume_changes`).

    SIGINT / SIGTERM write a checkpoint and raise
    :class:`~cd2p.engine.trainer.TrainingInterrupted`.

    Under ``torchrun`` every rank calls this; only rank 0 writes files.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    dist = D.init_distributed(recipe.run.device if recipe is not None else "auto")
    if dist.is_main:
        check_run_dir(out_dir, resume)
    D.barrier()
    info_path = out_dir / RUN_INFO
    saved = json.loads(info_path.read_text()) if resume and info_path.is_file() else None
    if resume:
        if not (out_dir / "recipe.yaml").is_file() or saved is None:
            raise FileNotFoundError(
                f"{out_dir} is not a cd2p pretrain run (no recipe.yaml/run.json)"
            )
        saved_recipe = load_recipe(out_dir / "recipe.yaml")
        if recipe is not None and recipe != saved_recipe:
            raise ValueError(
                f"the recipe differs from {out_dir / 'recipe.yaml'}; a resumed run keeps its "
                "recipe (change its length with --set schedule.epochs=N)"
            )
        recipe = apply_overrides(saved_recipe, overrides)
        changes = resume_changes(saved_recipe, recipe)
        data_paths = data_paths or saved["data"]
        recipe_name = recipe_name or saved.get("recipe_name")
    elif overrides:
        raise ValueError("overrides are for a resumed run; apply them to the recipe instead")
    if recipe is None or not data_paths:
        raise ValueError("run_pretrain needs a recipe and at least one prepared pairs directory")
    if recipe.task != "pretrain":
        raise ValueError(f"recipe task is {recipe.task!r}, not 'pretrain'")
    data = [Path(p).resolve() for p in data_paths]
    console = console or plain_console(stderr=True)
    if resume and dist.is_main:
        for change in changes:
            console.print(styled("[yellow]resumed with[/] {change}", change=change))

    dataset = _open_pairs(recipe, data)
    targets = TARGETS_OF_OBJECTIVE[recipe.pretrain.objective]
    target = targets[0] if targets else None
    on_the_fly = recipe.pretrain.targets == "on-the-fly" and target is not None
    if on_the_fly:
        teacher = teacher if teacher is not None else _build_teacher(recipe, dist.device)
        teacher = teacher.to(dist.device)
        teacher_desc, teacher_random = teacher.description, bool(teacher.is_random)
    elif target is not None:
        teacher = None
        teacher_desc, teacher_random = _stored_teacher(dataset)
    else:
        teacher, teacher_desc, teacher_random = None, "none (mae)", False

    seed_everything(recipe.run.seed)  # identical initial weights on every rank
    model = build_pretrain_model(recipe)
    if (
        target is not None
        and teacher is not None
        and tuple(teacher.target_shape) != tuple(model.target_shape)
    ):
        raise ValueError(
            f"the teacher gives {tuple(teacher.target_shape)} targets, objective "
            f"{recipe.pretrain.objective!r} needs {model.target_shape}"
        )
    fingerprint = None
    if dist.is_main:
        # The pairs and their stored targets, hashed once (a resumed run must read the same).
        # Their source says whether they are synthetic (`cd2p synthetic scannet`), so that
        # the run's cards can say so after the raw scans are gone.
        from cd2p.origin import pairs_source

        fingerprint = {**data_fingerprint(data), "path": ", ".join(str(p) for p in data),
                       "source": pairs_source(data)}  # fmt: skip
        check_same_data((saved or {}).get("data_fingerprint"), fingerprint, out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(
            info_path,
            {
                "recipe_name": recipe_name,
                "data": [str(p) for p in data],
                "pairs": len(dataset),
                "targets": "on-the-fly" if on_the_fly else ("stored" if target else "none"),
                "teacher": teacher_desc,
                "random_teacher": teacher_random,
                "data_fingerprint": fingerprint,
            },
        )
        if teacher_random:
            console.print(styled(
                "[bold yellow]warning:[/] the teacher is RANDOM (not CLIP): this student learns "
                "a pipeline test, not useful features"
            ))
    trainer_started = time.perf_counter()
    trainer = Trainer(
        PretrainStep(model),
        dataset,
        recipe,
        out_dir,
        collate_fn=PairCollate(decode_images=on_the_fly),
        prepare_batch=PrepareBatch(recipe, teacher if on_the_fly else None),
        progress=progress,
        console=console,
        resume_hint=f"cd2p pretrain --resume {out_dir}",
    )
    result = trainer.fit(resume=resume, stop_after=stop_after)

    backbone_dir = student_dir = None
    if result.completed and dist.is_main:
        training = _training_facts(
            recipe, recipe_name, data, len(dataset), result.step, result.epoch,
            result.final_loss, teacher_desc, teacher_random,
        )  # fmt: skip
        setup = trainer_started - started if not resume else 0.0
        prov = provenance(
            data=fingerprint,
            recipe=recipe,
            recipe_name=recipe_name,
            seeds=[recipe.run.seed],
            wall_time_s=result.wall_seconds + setup,
            device=trainer.device,
            world_size=dist.world_size,
            run_dir=out_dir,
            global_batch=recipe.data.batch_size,
        )
        backbone_dir = export_backbone(model, out_dir / BACKBONE_DIR, training, prov)
        if targets:
            student_dir = export_student(model, out_dir / STUDENT_DIR, recipe, data, training,
                                         prov)  # fmt: skip
        atomic_write_json(
            out_dir / SUMMARY,
            {
                "recipe_name": recipe_name,
                "objective": recipe.pretrain.objective,
                "steps": result.step,
                "epochs": result.epoch,
                "final_loss": result.final_loss,
                "final_components": result.final_components,
                "pairs": len(dataset),
                "teacher": teacher_desc,
                "random_teacher": teacher_random,
                "backbone": str(backbone_dir),
                "student": str(student_dir) if student_dir is not None else None,
                "weights_sha256": result.weights_sha256,
                "provenance": prov,
            },
        )
    D.barrier()
    return PretrainResult(
        run=result,
        backbone_dir=out_dir / BACKBONE_DIR if result.completed else None,
        student_dir=out_dir / STUDENT_DIR if result.completed and targets else None,
        pairs=len(dataset),
        teacher=teacher_desc,
        random_teacher=teacher_random,
        model=model,
    )
