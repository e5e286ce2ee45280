"""Scene semantic segmentation on top of the cd2p backbone (ScanNet, 20 classes)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cd2p.models.task_base import Cd2pTaskModel, point_mlp
from cd2p.ops import three_nn_interpolate


class Cd2pForSemanticSegmentation(Cd2pTaskModel, model_kind="segmentation"):
    """Backbone + 3-NN feature propagation + per-point convolutions:
    ``points (B, N, 3)`` [, ``colors (B, N, 3)``] -> class logits ``(B, N, num_classes)``.

    The backbone tokenizes the draw into ``num_groups`` patches (256 x 32 for ScanNet's 8192
    points) and encodes them; every point then takes the inverse-squared-distance weighted
    mean of the final (normed) tokens of its three nearest patch centers, concatenated with
    its own coordinates (and its colour when ``use_color``); two 1-D convolution blocks
    (``Conv1d -> BN -> ReLU``, widths ``head_channels``, dropout after the first) and a final
    ``Conv1d`` give the class scores.

    Args:
        backbone: :class:`~cd2p.Cd2pBackbone` constructor arguments.
        num_classes: output classes (ScanNet's benchmark: 20).
        head_channels: widths of the per-point convolution blocks.
        head_dropout: dropout after the first block.
        use_color: whether the head also reads each point's colour ``(B, N, 3)`` in [-1, 1].
        class_names: names of the classes, in label order (kept in ``config.json``).
        num_points: points per draw in training (a recorded hint for evaluation).
    """

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        num_classes: int = 20,
        head_channels: Sequence[int] = (256, 256),
        head_dropout: float = 0.5,
        use_color: bool = False,
        class_names: Sequence[str] | None = None,
        num_points: int = 8192,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        if not head_channels:
            raise ValueError("head_channels needs at least one width")
        super().__init__(backbone)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.use_color = use_color
        self.num_points = num_points
        in_channels = self.backbone.dim + 3 + (3 if use_color else 0)
        self.head = nn.Sequential(
            *point_mlp(in_channels, head_channels[:1]),
            nn.Dropout(head_dropout),
            *point_mlp(head_channels[0], head_channels[1:]),
            nn.Conv1d(head_channels[-1], num_classes, 1),
        )

    def forward(self, points: torch.Tensor, colors: torch.Tensor | None = None) -> torch.Tensor:
        """``points (B, N, 3)``, ``colors (B, N, 3)`` (when ``use_color``) -> logits
        ``(B, N, num_classes)``."""
        if self.use_color and colors is None:
            raise ValueError("this model reads colours (use_color): pass colors (B, N, 3)")
        out = self.backbone(points)
        # (B, N, dim); inputs are validated where data enters, not in the training step
        per_point = three_nn_interpolate(points, out.centers, out.tokens, validate=False)
        inputs = [per_point, points.to(per_point.dtype)]
        if self.use_color:
            assert colors is not None
            inputs.append(colors.to(per_point.dtype))
        x = torch.cat(inputs, dim=-1).transpose(1, 2)  # (B, C, N)
        return self.head(x).transpose(1, 2)


__all__ = ["Cd2pForSemanticSegmentation"]
