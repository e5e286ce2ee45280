"""Part segmentation on top of the cd2p backbone (Point-MAE's ShapeNetPart model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cd2p.models.task_base import Cd2pTaskModel, point_mlp
from cd2p.ops import three_nn_interpolate


def default_feature_blocks(depth: int) -> list[int]:
    """Three blocks evenly spaced through the depth, 1-based: 12 -> (4, 8, 12), 6 -> (2, 4, 6)."""
    return sorted({max(1, round(depth * i / 3)) for i in (1, 2, 3)})


class Cd2pForPartSegmentation(Cd2pTaskModel, model_kind="partseg"):
    """Backbone + feature propagation + per-point MLP:
    ``points (B, N, 3)``, ``category (B,)`` -> part logits ``(B, N, num_parts)``.

    As Point-MAE: the hidden states of three blocks (4, 8, 12 for depth 12), each through the
    backbone's final LayerNorm, are concatenated per patch ``(B, G, 3 * dim)``; their max and
    mean over the patches plus an embedding of the category one-hot form a global feature;
    the patch features are interpolated to every point from its three nearest centers
    (inverse squared distance), concatenated with the point's xyz and passed through a
    per-point MLP (1536, 1024); the head (512, 256 with dropout) reads that and the global
    feature for every point.

    Args:
        backbone: :class:`Cd2pBackbone` constructor arguments.
        num_parts: output part ids (50 for ShapeNetPart; part ids are global over categories).
        num_categories: object categories (the one-hot's width; 16 for ShapeNetPart).
        feature_blocks: 1-based blocks whose outputs are used (default: evenly spaced).
        label_channels: width of the category embedding.
        propagation_channels: widths of the per-point MLP after interpolation.
        head_channels: hidden widths of the per-point head.
        head_dropout: dropout after the first head layer.
        category_names: names of the categories (kept in ``config.json``).
        category_parts: the part ids of every category, used by :meth:`predict`.
        num_points: points per shape in training (a recorded hint for evaluation).
    """

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        num_parts: int = 50,
        num_categories: int = 16,
        feature_blocks: Sequence[int] | None = None,
        label_channels: int = 64,
        propagation_channels: Sequence[int] = (1536, 1024),
        head_channels: Sequence[int] = (512, 256),
        head_dropout: float = 0.5,
        category_names: Sequence[str] | None = None,
        category_parts: Sequence[Sequence[int]] | None = None,
        num_points: int = 2048,
    ) -> None:
        super().__init__(backbone)
        depth, dim = self.backbone.depth, self.backbone.dim
        blocks = list(feature_blocks) if feature_blocks else default_feature_blocks(depth)
        if any(not 1 <= b <= depth for b in blocks):
            raise ValueError(f"feature_blocks {blocks} must lie in [1, depth={depth}]")
        if category_parts is not None:
            if len(category_parts) != num_categories:
                raise ValueError(
                    f"{len(category_parts)} part lists for {num_categories} categories"
                )
            if any(p < 0 or p >= num_parts for parts in category_parts for p in parts):
                raise ValueError(f"category_parts hold part ids outside [0, {num_parts})")
        self.feature_blocks = blocks
        self.num_points = num_points
        self.num_parts = num_parts
        self.num_categories = num_categories
        self.category_names = list(category_names) if category_names is not None else None
        self.category_parts = [list(p) for p in category_parts] if category_parts else None
        feat = len(blocks) * dim
        self.label_embed = nn.Sequential(
            nn.Linear(num_categories, label_channels, bias=False),
            nn.BatchNorm1d(label_channels),
            nn.LeakyReLU(0.2),
        )
        self.propagation = point_mlp(feat + 3, propagation_channels)
        head_in = propagation_channels[-1] + 2 * feat + label_channels
        self.head = nn.Sequential(
            *point_mlp(head_in, head_channels[:1]),
            nn.Dropout(head_dropout),
            *point_mlp(head_channels[0], head_channels[1:]),
            nn.Conv1d(head_channels[-1], num_parts, 1),
        )

    def forward(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """``points (B, N, 3)``, ``category (B,)`` int -> part logits ``(B, N, num_parts)``."""
        groups = self.backbone.group(points)
        tokens, pos = self.backbone.embed(groups.neighborhoods, groups.centers)
        _, hidden = self.backbone.encode(tokens, pos, output_hidden_states=True)
        assert hidden is not None
        feats = torch.cat([self.backbone.norm(hidden[b - 1]) for b in self.feature_blocks], -1)
        n = points.shape[1]
        onehot = F.one_hot(category.long(), self.num_categories).to(feats.dtype)
        global_feat = torch.cat(
            [feats.max(dim=1).values, feats.mean(dim=1), self.label_embed(onehot)], dim=-1
        )  # (B, 2 * feat + label_channels)
        # (B, N, feat); inputs are validated where data enters, not in the training step
        per_point = three_nn_interpolate(points, groups.centers, feats, validate=False)
        x = self.propagation(torch.cat([points.to(feats.dtype), per_point], -1).transpose(1, 2))
        x = torch.cat([x, global_feat.unsqueeze(-1).expand(-1, -1, n)], dim=1)
        return self.head(x).transpose(1, 2)

    @torch.no_grad()
    def predict(self, points: torch.Tensor, category: torch.Tensor) -> torch.Tensor:
        """Part id of every point ``(B, N)``, chosen among its category's parts when known."""
        logits = self(points, category)
        if self.category_parts is None:
            return logits.argmax(-1)
        allowed = torch.zeros(self.num_categories, self.num_parts, dtype=torch.bool)
        for c, parts in enumerate(self.category_parts):
            allowed[c, parts] = True
        allowed = allowed.to(logits.device)[category.long()].unsqueeze(1)
        return logits.masked_fill(~allowed, float("-inf")).argmax(-1)


__all__ = ["Cd2pForPartSegmentation", "default_feature_blocks"]
