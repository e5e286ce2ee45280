"""Zero-shot classification through CLIP's text space (``cd2p zeroshot``,
docs/method.md#zero-shot-classification).

A student pre-trained with the ``distill+clip`` objective predicts, from a point cloud, the
512-d CLIP image embedding that the teacher computed from the paired RGB frame. CLIP's text
tower (open_clip ``ViT-B-32-quickgelu``, the same weights as the teacher's image tower) embeds
prompts for every class name; a cloud is given the class whose text embedding is most similar
(cosine) to its predicted embedding. The class embeddings follow CLIP's own prompt ensembling
(its "Prompt Engineering for ImageNet" notebook): embed every prompt of the class, normalise
each, average, normalise the mean.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cd2p.models.teacher import DEFAULT_MODEL_NAME, load_clip_model, random_clip_model

# The default prompt ensemble: six of CLIP's ImageNet templates (the student imitates CLIP
# image embeddings of photographs), an indoor one (the pairs are indoor views) and 3D wordings
# like those point-cloud CLIP models (ULIP, OpenShape) use.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a photo of a small {}.",
    "a photo of a large {}.",
    "a cropped photo of a {}.",
    "a close-up photo of a {}.",
    "a photo of a {} in a room.",
    "a point cloud of a {}.",
    "a 3D model of a {}.",
    "a depth scan of a {}.",
)


class ClipTextTower(nn.Module):
    """CLIP's text encoder (open_clip), frozen, fp32, eval mode: prompts -> ``(N, 512)``
    un-normalised text embeddings (``encode_text``).

    Build it with :meth:`from_pretrained` (open_clip's ``openai`` weights, or a local state dict
    of both towers such as ``open_clip_model.safetensors``) or :meth:`random` (seeded, NOT
    CLIP: tests and offline demos; the same seed gives the random teacher's CLIP).
    """

    def __init__(
        self, clip: nn.Module, model_name: str, description: str, is_random: bool
    ) -> None:
        super().__init__()
        clip.visual = None  # only the text tower is used; the image tower is the teacher's
        self.clip = clip
        self.model_name = model_name
        self.description = description
        self.is_random = is_random
        import open_clip

        self._tokenize = open_clip.get_tokenizer(model_name)
        self.float()
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ClipTextTower:
        """Always eval mode."""
        return super().train(False)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @torch.no_grad()
    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """``texts`` -> ``(len(texts), 512)`` fp32 text embeddings (not normalised)."""
        tokens = self._tokenize(list(texts)).to(self.device)
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.clip.encode_text(tokens).float()

    @classmethod
    def from_pretrained(
        cls,
        clip_weights: str | Path | None = None,
        model_name: str = DEFAULT_MODEL_NAME,
        device: str | torch.device = "cpu",
        cache_dir: str | Path | None = None,
    ) -> ClipTextTower:
        """The real text tower: the teacher's CLIP (``clip_weights`` or the ``openai``
        download; the same errors and instructions when offline)."""
        model, source = load_clip_model(model_name, clip_weights, cache_dir)
        return cls(model, model_name, f"CLIP {model_name} text tower ({source})", False).to(
            device
        )

    @classmethod
    def random(
        cls, seed: int = 0, model_name: str = DEFAULT_MODEL_NAME, device: str | torch.device = "cpu"
    ) -> ClipTextTower:
        """The text tower with seeded random weights (NOT CLIP)."""
        model = random_clip_model(seed, model_name)
        description = f"RANDOM CLIP text tower (seed {seed}) — not CLIP ({model_name})"
        return cls(model, model_name, description, True).to(device)


def read_prompts(path: str | Path) -> list[str]:
    """Prompt templates from a text file: one per line, ``{}`` where the class name goes;
    blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        text = line.strip()
        if not text or text.startswith("#"):
            continue
        check_prompt(text, f"{path}:{number}")
        prompts.append(text)
    if not prompts:
        raise ValueError(f"{path} holds no prompt (one template per line, with {{}})")
    return prompts


def check_prompt(template: str, where: str = "prompt") -> None:
    """A template must hold exactly one ``{}`` and no other braces."""
    try:
        filled = template.format("x")
    except (IndexError, KeyError, ValueError):
        filled = None
    if template.count("{}") != 1 or filled is None:
        raise ValueError(
            f"{where}: {template!r} must contain exactly one {{}} where the class name goes "
            "(and no other braces)"
        )


def readable_class_name(name: str) -> str:
    """``"night_stand"`` -> ``"night stand"``: the words a prompt should hold."""
    return name.replace("_", " ").strip()


@torch.no_grad()
def class_embeddings(
    tower: nn.Module, class_names: Sequence[str], prompts: Sequence[str] = DEFAULT_PROMPTS
) -> torch.Tensor:
    """``(C, 512)`` unit text embeddings, one per class: CLIP's prompt ensemble (every prompt
    embedded and normalised, the mean normalised again)."""
    if not prompts:
        raise ValueError("at least one prompt template is needed")
    for template in prompts:
        check_prompt(template)
    rows = []
    for name in class_names:
        texts = [template.format(readable_class_name(name)) for template in prompts]
        embedded = F.normalize(tower(texts).float(), dim=-1)
        rows.append(F.normalize(embedded.mean(dim=0), dim=-1))
    return torch.stack(rows)


@torch.no_grad()
def zero_shot_logits(
    student: nn.Module,
    data: Any,
    text_embeddings: torch.Tensor,
    *,
    batch_size: int = 32,
    num_points: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Cosine similarities ``(S, C)`` between each cloud's predicted CLIP embedding and the
    class embeddings. Every cloud of ``data`` (a ``ClassificationSplit``) is prepared as in
    pre-training (:meth:`Cd2pStudent.prepare_points`, cloud ``i`` drawn with ``seed + i``)."""
    from cd2p.data.clouds import pretraining_view

    if "clip" not in getattr(student, "outputs", ()):
        raise ValueError(
            f"this student (objective {getattr(student, 'objective', '?')!r}) predicts no CLIP "
            "embedding: zero-shot classification needs one pre-trained with objective "
            "distill+clip (recipe pretrain-scannet-zeroshot) or distill-clip"
        )
    device = next(student.parameters()).device
    points_per_cloud = num_points or student.num_points
    classes = F.normalize(text_embeddings.float(), dim=-1).to(device)
    out = []
    for start in range(0, len(data), batch_size):
        clouds = data.points[start : start + batch_size]
        batch = torch.stack(
            [
                torch.from_numpy(
                    pretraining_view(
                        cloud.numpy(), points_per_cloud, student.voxel_size, seed + start + i
                    )
                )
                for i, cloud in enumerate(clouds)
            ]
        ).to(device)
        embedding = F.normalize(student(batch).clip_embedding.float(), dim=-1)
        out.append((embedding @ classes.T).cpu())
        if progress is not None:
            progress(len(clouds))
    return torch.cat(out) if out else torch.empty(0, len(classes))


def evaluate_zeroshot(
    student: nn.Module,
    data: Any,
    tower: nn.Module,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    *,
    batch_size: int = 32,
    num_points: int | None = None,
    seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """Zero-shot classification of a ``ClassificationSplit``: an
    :class:`~cd2p.engine.evaluation.EvalReport` (task ``zeroshot``) with OA, mean class
    accuracy, the per-class table and the confusion matrix; ``extra`` records the prompts,
    the text tower and the class names."""
    from cd2p.engine.evaluation import EvalReport
    from cd2p.engine.metrics import (
        confusion_matrix,
        mean_class_accuracy,
        overall_accuracy,
        per_class_accuracy,
    )

    texts = class_embeddings(tower, data.class_names, prompts)
    logits = zero_shot_logits(
        student,
        data,
        texts,
        batch_size=batch_size,
        num_points=num_points,
        seed=seed,
        progress=progress,
    )
    conf = confusion_matrix(logits.argmax(-1), data.labels, len(data.class_names))
    acc = per_class_accuracy(conf)
    support = conf.sum(1)
    rows = [
        {"name": name, "support": int(support[i]), "acc": float(acc[i])}
        for i, name in enumerate(data.class_names)
    ]
    metrics = {"oa": overall_accuracy(conf), "macc": mean_class_accuracy(conf)}
    extra = {
        "prompts": list(prompts),
        "text_tower": getattr(tower, "description", type(tower).__name__),
        "random_text_tower": bool(getattr(tower, "is_random", False)),
        "class_names": list(data.class_names),
        "num_points": num_points or student.num_points,
        "chance": 1.0 / len(data.class_names),
    }
    return EvalReport(
        "zeroshot", metrics, rows, list(data.class_names), conf, len(data), 1, extra
    )


def write_zeroshot(report: Any, out: str | Path, title: str, **facts: Any) -> list[Path]:
    """``out/metrics.json`` (the report and ``facts``: model, data, dataset, split) and
    ``out/confusion_matrix.png``, each written atomically."""
    from cd2p._atomic import atomic_write_json
    from cd2p.engine.metrics import plot_confusion_matrix

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", {**report.to_json(), **facts})
    png = plot_confusion_matrix(report.confusion, report.class_names, out / "confusion_matrix.png",
                                title)  # fmt: skip
    return [out / "metrics.json", png]


__all__ = [
    "DEFAULT_PROMPTS",
    "ClipTextTower",
    "check_prompt",
    "class_embeddings",
    "evaluate_zeroshot",
    "read_prompts",
    "readable_class_name",
    "write_zeroshot",
    "zero_shot_logits",
]
