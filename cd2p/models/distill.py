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

OBJECTIVES = ("distill", "distill-no-concept", "distill-clip", "mae", "mae+distill")


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
        clip_dim: the CLIP embedding's width (512), target of ``distill-clip``.
        mask_ratio: share of patches hidden by ``mae`` (0.6).
        decoder_depth, decoder_heads: the MAE decoder (4 blocks, 6 heads).

    Only the heads the objective uses are built, so the state dict holds exactly the trained
    weights. ``forward(points (B, N, 3), target (B, *target_shape) | None)`` returns a dict with
    the scalar ``loss`` to optimise and its components ``loss_distill`` / ``loss_mae``
    (detached, for logging).
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
        self.backbone = Cd2pBackbone(**self.backbone_config)
        dim = self.backbone.dim
        groups = self.backbone.num_groups

        self.concepts: ConceptExtractor | None = None
        self.align: AlignmentHead | None = None
        self.mae_decoder: MaeDecoder | None = None
        self._target_shape: tuple[int, int] | None = None
        if objective in ("distill", "mae+distill"):
            self._target_shape = (prefix_tokens, prefix_dim)
            self.concepts = ConceptExtractor(
                dim, num_concepts, self.backbone.num_heads, self._mlp_ratio()
            )
            self.align = AlignmentHead(dim, num_concepts, prefix_tokens, prefix_dim)
        elif objective == "distill-no-concept":
            self._target_shape = (prefix_tokens, prefix_dim)
            self.align = AlignmentHead(dim, groups, prefix_tokens, prefix_dim)
        elif objective == "distill-clip":
            self._target_shape = (1, clip_dim)
            self.concepts = ConceptExtractor(
                dim, num_concepts, self.backbone.num_heads, self._mlp_ratio()
            )
            self.align = AlignmentHead(dim, num_concepts, 1, clip_dim)
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
    ) -> dict[str, torch.Tensor]:
        """Losses of the objective for ``points (B, N, 3)``.

        Args:
            points: input clouds ``(B, N, 3)``.
            target: teacher target ``(B, *target_shape)`` (any float dtype, e.g. stored fp16);
                detached here. Required by the distillation objectives, ignored by ``mae``.
            generator: RNG for the MAE mask; the global RNG when ``None``.

        Returns:
            ``{"loss": scalar, "loss_distill": detached scalar, "loss_mae": detached scalar}``,
            with only the components the objective has.
        """
        groups = self.backbone.group(points)
        tokens, pos = self.backbone.embed(groups.neighborhoods, groups.centers)
        out: dict[str, torch.Tensor] = {}
        total = None
        if self._target_shape is not None:
            target = self._check_target(target, points.shape[0])
            predicted = self._predict_from_embeddings(tokens, pos)
            loss = F.mse_loss(predicted.float(), target.float())
            out["loss_distill"] = loss.detach()
            total = loss
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
        groups = self.backbone.group(points)
        tokens, pos = self.backbone.embed(groups.neighborhoods, groups.centers)
        return self._predict_from_embeddings(tokens, pos)

    def _predict_from_embeddings(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Patch tokens and positions ``(B, G, dim)`` -> prediction ``(B, *target_shape)``."""
        if self.concepts is None:  # distill-no-concept
            final, _ = self.backbone.encode(tokens, pos)
            return self.align(final)
        final, hidden = self.backbone.encode(tokens, pos, output_hidden_states=True)
        # The last context is the final-normed output: what downstream heads see, and it keeps
        # the backbone's final LayerNorm in the graph (no unused parameters under DDP).
        contexts = (*hidden[:-1], final)
        return self.align(self.concepts(contexts))

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

    def _check_target(self, target: torch.Tensor | None, batch: int) -> torch.Tensor:
        expected = (batch, *self._target_shape)
        if target is None:
            raise ValueError(
                f"objective {self.objective!r} needs a teacher target of shape {expected}"
            )
        if tuple(target.shape) != expected:
            raise ValueError(
                f"objective {self.objective!r} expects targets of shape {expected}, "
                f"got {tuple(target.shape)}"
            )
        return target.detach()

    # -- export -----------------------------------------------------------------------------
    def export_backbone(self) -> Cd2pBackbone:
        """A standalone ``Cd2pBackbone`` on CPU with the trained weights (``save_pretrained``-able).

        The copy shares no storage with this model, so training on does not change it.
        """
        backbone = Cd2pBackbone(**self.backbone_config)
        state = {k: v.detach().to("cpu", copy=True) for k, v in self.backbone.state_dict().items()}
        backbone.load_state_dict(state, strict=True)
        return backbone.eval()
