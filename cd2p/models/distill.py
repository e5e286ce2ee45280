"""The pre-training model: the student backbone plus the heads of its objective
(docs/method.md#objectives).

Objectives (the paper's ablations), selected by name:

``distill``
    backbone (all hidden states) -> :class:`ConceptExtractor` (32 concepts) ->
    :class:`AlignmentHead` (32 -> 10 tokens, 768 wide) -> MSE with ClipCap's semantic prefix
    ``(B, 10, 768)``.
``distill-no-concept``
    :class:`AlignmentHead` on the final backbone tokens directly (``G`` -> 10 tokens).
``distill-clip``
    as ``distill``, but the target is the 512-d CLIP image embedding as one token:
    alignment head 32 -> 1 token, 512 wide, target ``(B, 1, 512)``.
``distill+clip``
    ``distill`` plus a second alignment head (``clip_head``, 32 -> 1 token, 512 wide) on the
    same concepts that predicts the CLIP image embedding, for zero-shot classification through
    CLIP's text space: ``loss = MSE(prefix) + clip_weight * (1 - cos(clip, CLIP embedding))``.
    The embedding loss is a cosine distance because zero-shot classification compares
    directions only (cosine similarity with text embeddings); its scale is that of the prefix
    MSE's early values, so ``clip_weight`` 1 gives both comparable weight.
``mae``
    Point-MAE: 60 % of the patches hidden, the backbone's blocks encode the visible ones, a
    4-block decoder predicts the hidden ones, Chamfer-L2 (:mod:`cd2p.models.mae`). As in
    Point-MAE, all patches are embedded before masking (BatchNorm statistics over every patch).
``mae+distill``
    ``loss = loss_distill + loss_mae``. Distillation runs on a separate **full, unmasked**
    pass so the concepts see the whole scene the teacher's image shows, and the features it
    shapes are those that fine-tuning uses; the masked pass reuses the grouping and the patch
    embeddings of the full pass (gathering the visible ones), so only the transformer blocks
    run twice. Cost: the blocks on ``G`` + 0.4 ``G`` tokens plus the decoder (4 blocks on ``G``
    tokens); for the paper's model, 25.7 GFLOP per sample (forward + backward, 4096 points)
    against 19.5 for ``distill`` and 12.3 for ``mae`` (``torch.utils.flop_counter``).

The teacher is **not** part of this module: its targets (stored by ``cd2p prepare teacher`` or
computed on the fly by the caller under ``torch.no_grad``) are passed to :meth:`forward` and
detached there. Gradients therefore cannot reach the teacher, the optimiser never sees its
parameters, and checkpoints of this module never contain its weights.

Every parameter of the model takes part in every step of its objective (for ``distill`` the
last context of the concept extractor is the backbone's final-normed output, so the final
LayerNorm is trained too), which lets DDP run with ``find_unused_parameters=False``.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cd2p.models.alignment import AlignmentHead
from cd2p.models.backbone import Cd2pBackbone
from cd2p.models.concepts import ConceptExtractor
from cd2p.models.mae import (
    MaeDecoder,
    gather_patches,
    num_masked,
    random_mask,
    reconstruction_loss,
)
from cd2p.ops import Groups

OBJECTIVES = ("distill", "distill-no-concept", "distill-clip", "distill+clip", "mae", "mae+distill")

#: What the student of each objective predicts: ``"prefix"`` (10, 768) and/or ``"clip"`` (512).
STUDENT_OUTPUTS: dict[str, tuple[str, ...]] = {
    "distill": ("prefix",),
    "distill-no-concept": ("prefix",),
    "distill-clip": ("clip",),
    "distill+clip": ("prefix", "clip"),
    "mae": (),
    "mae+distill": ("prefix",),
}


def cosine_distance(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean of ``1 - cos`` between ``(B, ...)`` predictions and targets (flattened per sample),
    in fp32."""
    return (1 - F.cosine_similarity(predicted.flatten(1).float(), target.flatten(1).float())).mean()


def build_student_heads(
    backbone: Cd2pBackbone,
    objective: str,
    num_concepts: int = 32,
    prefix_tokens: int = 10,
    prefix_dim: int = 768,
    clip_dim: int = 512,
    mlp_ratio: float = 4.0,
) -> tuple[ConceptExtractor | None, AlignmentHead | None, AlignmentHead | None]:
    """The heads of the student of ``objective``: ``(concepts, align, clip_head)``, ``None``
    where absent. ``align`` is the main head (the prefix; the CLIP embedding for
    ``distill-clip``, as its checkpoints name it); ``clip_head`` the second head of
    ``distill+clip``. Shared by the pre-training model and the exported student, so that their
    parameter names are the same. ``mlp_ratio`` is the backbone's (the concept block's FFN)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}")
    outputs = STUDENT_OUTPUTS[objective]
    if not outputs:
        return None, None, None
    dim = backbone.dim
    if objective == "distill-no-concept":
        return None, AlignmentHead(dim, backbone.num_groups, prefix_tokens, prefix_dim), None
    concepts = ConceptExtractor(dim, num_concepts, backbone.num_heads, mlp_ratio)
    if outputs[0] == "prefix":
        align = AlignmentHead(dim, num_concepts, prefix_tokens, prefix_dim)
    else:
        align = AlignmentHead(dim, num_concepts, 1, clip_dim)
    clip_head = AlignmentHead(dim, num_concepts, 1, clip_dim) if "clip" in outputs[1:] else None
    return concepts, align, clip_head


def student_outputs(
    student: nn.Module, tokens: torch.Tensor, pos: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Patch tokens and positions ``(B, G, dim)`` -> the student's predictions
    ``{"prefix": (B, T, C), "clip": (B, 1, clip_dim)}`` (those its objective has).

    ``student`` has ``objective``, ``backbone``, ``concepts``, ``align`` and ``clip_head``
    (:class:`Cd2pPretrainModel` or :class:`~cd2p.models.student.Cd2pStudent`).
    """
    outputs = STUDENT_OUTPUTS[student.objective]
    if student.concepts is None:  # distill-no-concept
        final, _ = student.backbone.encode(tokens, pos)
        return {outputs[0]: student.align(final)}
    final, hidden = student.backbone.encode(tokens, pos, output_hidden_states=True)
    # The last context is the final-normed output: what downstream heads see, and it keeps
    # the backbone's final LayerNorm in the graph (no unused parameters under DDP).
    concepts = student.concepts((*hidden[:-1], final))
    out = {outputs[0]: student.align(concepts)}
    if student.clip_head is not None:
        out["clip"] = student.clip_head(concepts)
    return out


def backbone_defaults() -> dict[str, Any]:
    """``Cd2pBackbone``'s constructor arguments and their defaults."""
    params = inspect.signature(Cd2pBackbone.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


class Cd2pPretrainModel(nn.Module):
    """Student backbone + concept extractor / alignment head / MAE decoder, by objective.

    Args:
        backbone_config: ``Cd2pBackbone`` arguments; missing ones take the backbone's defaults.
        objective: one of :data:`OBJECTIVES`.
        num_concepts: learnable concept queries (32).
        prefix_tokens, prefix_dim: the semantic prefix's shape (10, 768).
        clip_dim: the CLIP embedding's width (512), target of ``distill-clip`` and of the
            second head of ``distill+clip``.
        mask_ratio: share of patches hidden by ``mae`` (0.6).
        decoder_depth, decoder_heads: the MAE decoder (4 blocks, 6 heads).
        clip_weight: weight of the embedding loss of ``distill+clip``.

    Only the heads the objective uses are built, so the state dict holds exactly the trained
    weights. ``forward(points (B, N, 3), target (B, *target_shape) | None, clip_target=(B, 1,
    512))`` returns a dict with the scalar ``loss`` to optimise and its components
    ``loss_distill`` / ``loss_clip`` / ``loss_mae`` (detached, for logging).
    """

    def __init__(
        self,
        backbone_config: dict[str, Any] | None = None,
        objective: str = "distill",
        num_concepts: int = 32,
        prefix_tokens: int = 10,
        prefix_dim: int = 768,
        clip_dim: int = 512,
        mask_ratio: float = 0.6,
        decoder_depth: int = 4,
        decoder_heads: int = 6,
        clip_weight: float = 1.0,
    ) -> None:
        super().__init__()
        if objective not in OBJECTIVES:
            raise ValueError(
                f"unknown objective {objective!r}; choose one of {', '.join(OBJECTIVES)}"
            )
        defaults = backbone_defaults()
        unknown = sorted(set(backbone_config or {}) - set(defaults))
        if unknown:
            raise ValueError(
                f"unknown backbone_config keys {unknown}; Cd2pBackbone takes {sorted(defaults)}"
            )
        self.backbone_config = {**defaults, **(backbone_config or {})}
        self.objective = objective
        self.mask_ratio = mask_ratio
        self.clip_weight = clip_weight
        self.backbone = Cd2pBackbone(**self.backbone_config)
        dim = self.backbone.dim
        groups = self.backbone.num_groups
        self.concepts, self.align, self.clip_head = build_student_heads(
            self.backbone,
            objective,
            num_concepts,
            prefix_tokens,
            prefix_dim,
            clip_dim,
            self._mlp_ratio(),
        )
        self.mae_decoder: MaeDecoder | None = None
        self._target_shape: tuple[int, int] | None = None
        outputs = STUDENT_OUTPUTS[objective]
        if outputs:  # the first output is the main target (the one `target` holds)
            self._target_shape = (prefix_tokens, prefix_dim) if outputs[0] == "prefix" else (
                1, clip_dim
            )
        self._clip_shape = (1, clip_dim) if "clip" in outputs[1:] else None
        self._num_concepts = num_concepts
        self._prefix_shape = (prefix_tokens, prefix_dim)
        self._clip_dim = clip_dim
        if objective in ("mae", "mae+distill"):
            num_masked(groups, mask_ratio)  # fail now, not at the first step
            self.mae_decoder = MaeDecoder(
                dim, self.backbone.group_size, decoder_depth, decoder_heads, self._mlp_ratio()
            )

    def _mlp_ratio(self) -> float:
        return float(self.backbone_config["mlp_ratio"])

    @property
    def target_shape(self) -> tuple[int, int] | None:
        """Per-sample teacher target shape: ``(10, 768)``, ``(1, 512)``, or ``None`` for ``mae``."""
        return self._target_shape

    # -- forward ----------------------------------------------------------------------------
    def forward(
        self,
        points: torch.Tensor,
        target: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        clip_target: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Losses of the objective for ``points (B, N, 3)``.

        Args:
            points: input clouds ``(B, N, 3)``.
            target: teacher target ``(B, *target_shape)`` (any float dtype, e.g. stored fp16);
                detached here. Required by the distillation objectives, ignored by ``mae``.
            generator: RNG for the MAE mask; the global RNG when ``None``.
            clip_target: the CLIP image embedding ``(B, 1, 512)``, required by
                ``distill+clip`` (its second head's target); detached here.

        Returns:
            ``{"loss": scalar, "loss_distill": detached scalar, "loss_clip": ...,
            "loss_mae": ...}``, with only the components the objective has.
        """
        groups = self.backbone.group(points)
        tokens, pos = self.backbone.embed(groups.neighborhoods, groups.centers)
        out: dict[str, torch.Tensor] = {}
        total = None
        if self._target_shape is not None:
            target = self._check_target(target, points.shape[0])
            predicted = student_outputs(self, tokens, pos)
            main = STUDENT_OUTPUTS[self.objective][0]
            loss = F.mse_loss(predicted[main].float(), target.float())
            out["loss_distill"] = loss.detach()
            total = loss
            if self._clip_shape is not None:
                clip_target = self._check_target(
                    clip_target, points.shape[0], self._clip_shape, "clip_target"
                )
                clip_loss = cosine_distance(predicted["clip"], clip_target)
                out["loss_clip"] = clip_loss.detach()
                total = total + self.clip_weight * clip_loss
        if self.mae_decoder is not None:
            loss = self._mae_loss(groups, tokens, pos, generator)
            out["loss_mae"] = loss.detach()
            total = loss if total is None else total + loss
        out["loss"] = total
        return out

    @torch.no_grad()
    def predict(self, points: torch.Tensor) -> torch.Tensor:
        """The student's guess of the teacher target, ``(B, *target_shape)``.

        For ``distill`` this is a semantic prefix ClipCap's GPT-2 can caption.
        """
        if self._target_shape is None:
            raise ValueError("the 'mae' objective predicts no teacher target")
        return self.predict_all(points)[STUDENT_OUTPUTS[self.objective][0]]

    @torch.no_grad()
    def predict_all(self, points: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every output of the student: ``{"prefix": (B, 10, 768), "clip": (B, 1, 512)}``
        (those the objective has)."""
        groups = self.backbone.group(points)
        tokens, pos = self.backbone.embed(groups.neighborhoods, groups.centers)
        return student_outputs(self, tokens, pos)

    def _mae_loss(
        self,
        groups: Groups,
        tokens: torch.Tensor,
        pos: torch.Tensor,
        generator: torch.Generator | None,
    ) -> torch.Tensor:
        """Point-MAE on already embedded patches: encode the visible, predict the hidden."""
        b, g = tokens.shape[:2]
        visible_idx, masked_idx = random_mask(b, g, self.mask_ratio, tokens.device, generator)
        encoded, _ = self.backbone.encode(
            gather_patches(tokens, visible_idx), gather_patches(pos, visible_idx)
        )
        predicted = self.mae_decoder(
            encoded,
            gather_patches(groups.centers, visible_idx),
            gather_patches(groups.centers, masked_idx),
        )
        return reconstruction_loss(predicted, gather_patches(groups.neighborhoods, masked_idx))

    def _check_target(
        self,
        target: torch.Tensor | None,
        batch: int,
        shape: tuple[int, int] | None = None,
        what: str = "target",
    ) -> torch.Tensor:
        expected = (batch, *(shape or self._target_shape))
        name = "a teacher target" if what == "target" else f"a teacher {what}"
        if target is None:
            raise ValueError(f"objective {self.objective!r} needs {name} of shape {expected}")
        if tuple(target.shape) != expected:
            raise ValueError(
                f"objective {self.objective!r} expects {what}s of shape {expected}, "
                f"got {tuple(target.shape)}"
            )
        return target.detach()

    # -- export -----------------------------------------------------------------------------
    def export_student(self, num_points: int, voxel_size: float | None = None):
        """A standalone :class:`~cd2p.models.student.Cd2pStudent` on CPU: the backbone, concept
        extractor and alignment head(s), with the point preprocessing of pre-training
        (``num_points`` points, ``voxel_size`` grid of the pairs; ``save_pretrained``-able).
        The ``mae`` objective has no student to export."""
        from cd2p.models.student import Cd2pStudent

        if not STUDENT_OUTPUTS[self.objective]:
            raise ValueError(
                f"objective {self.objective!r} predicts no teacher target: there is no student "
                "to export (its backbone is in RUN/backbone)"
            )
        student = Cd2pStudent(
            backbone=dict(self.backbone_config),
            objective=self.objective,
            num_concepts=self._num_concepts,
            prefix_tokens=self._prefix_shape[0],
            prefix_dim=self._prefix_shape[1],
            clip_dim=self._clip_dim,
            num_points=num_points,
            voxel_size=voxel_size,
        )
        kept = {
            k: v.detach().to("cpu", copy=True)
            for k, v in self.state_dict().items()
            if not k.startswith("mae_decoder.")
        }
        student.load_state_dict(kept, strict=True)
        return student.eval()

    def export_backbone(self) -> Cd2pBackbone:
        """A standalone ``Cd2pBackbone`` on CPU with the trained weights (``save_pretrained``-able).

        The copy shares no storage with this model, so training on does not change it.
        """
        backbone = Cd2pBackbone(**self.backbone_config)
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.backbone.state_dict().items()}
        backbone.load_state_dict(state, strict=True)
        return backbone.eval()
