"""Object classification on top of the cd2p backbone (Point-MAE's fine-tuning model)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import nn

from cd2p.models.task_base import Cd2pTaskModel, mlp_head


class Cd2pForClassification(
    Cd2pTaskModel, model_kind="classification", optional_config={"head_norm": True}
):
    """Backbone + class token + MLP head: ``points (B, N, 3)`` -> logits ``(B, num_classes)``.

    As Point-MAE's fine-tuning model: a learnable class token (and its positional embedding)
    is prepended to the patch tokens, the transformer runs over both, and the head reads the
    concatenation of the class token and the max-pool of the patch tokens ``(B, 2 * dim)``
    through ``Linear -> BN -> ReLU -> Dropout`` blocks (256, 256) to the classes.

    Started from a backbone that has its own class token (Point-BERT's pre-trained encoder,
    ``class_token=True``), the classifier takes that token and its position as its own, as
    Point-BERT's fine-tuning does; its backbone is then built without one.

    Args:
        backbone: :class:`Cd2pBackbone` constructor arguments (``dim``, ``depth``, ...).
        num_classes: output classes.
        head_channels: hidden widths of the head.
        head_dropout: dropout after every hidden layer of the head.
        class_names: names of the classes, in label order (kept in ``config.json``).
        num_points: points per cloud in training; evaluation uses as many (a recorded hint,
            the network itself accepts any ``N``).
        head_type: ``"mlp"`` (the above) or ``"linear-probe"``: what a linear-probe run
            exports, a frozen backbone's max- and mean-pooled final tokens ``(B, 2 * dim)``,
            standardised by the training features' ``feature_mean`` / ``feature_std`` buffers,
            then one ``Linear`` to the classes (no class token).
        head_norm: BatchNorm after every hidden layer of the head (Point-MAE); ``False`` gives
            Point-BERT's ``Linear -> ReLU -> Dropout`` head.
    """

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        num_classes: int = 40,
        head_channels: Sequence[int] = (256, 256),
        head_dropout: float = 0.5,
        class_names: Sequence[str] | None = None,
        num_points: int = 1024,
        head_type: Literal["mlp", "linear-probe"] = "mlp",
        head_norm: bool = True,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        if (backbone or {}).get("class_token"):
            raise ValueError(
                "Cd2pForClassification has its own class token; build its backbone without "
                "class_token (from_backbone moves a pre-trained class token into the classifier)"
            )
        super().__init__(backbone)
        self.num_classes = num_classes
        self.class_names = list(class_names) if class_names is not None else None
        self.num_points = num_points
        self.head_type = head_type
        dim = self.backbone.dim
        if head_type == "linear-probe":
            self.register_buffer("feature_mean", torch.zeros(2 * dim))
            self.register_buffer("feature_std", torch.ones(2 * dim))
            self.head = nn.Linear(2 * dim, num_classes)
            return
        if head_type != "mlp":
            raise ValueError(f"head_type must be 'mlp' or 'linear-probe', got {head_type!r}")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_pos, std=0.02)
        self.head = mlp_head(2 * dim, head_channels, num_classes, head_dropout, norm=head_norm)

    @classmethod
    def task_backbone_config(cls, pretrained_config: dict[str, Any]) -> dict[str, Any]:
        """Without ``class_token``: a pre-trained class token becomes the classifier's."""
        return {k: v for k, v in pretrained_config.items() if k != "class_token"}

    def adopt_backbone_weights(self, state: dict[str, Any]) -> None:
        """The backbone's weights; a pre-trained class token and its position (Point-BERT)
        initialise the classifier's, as Point-BERT's ``load_model_from_ckpt`` does."""
        state = dict(state)
        token, pos = state.pop("cls_token", None), state.pop("cls_pos", None)
        self.backbone.load_state_dict(state, strict=True)
        if token is not None and pos is not None and self.head_type == "mlp":
            with torch.no_grad():
                self.cls_token.copy_(token)
                self.cls_pos.copy_(pos)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimiser must not decay: the class token and its position."""
        return {"cls_token", "cls_pos"} if self.head_type == "mlp" else set()

    def probe_features(self, points: torch.Tensor) -> torch.Tensor:
        """``points (B, N, 3)`` -> the standardised pooled features ``(B, 2 * dim)`` a
        linear-probe head reads."""
        tokens = self.backbone(points).tokens
        pooled = torch.cat([tokens.max(1).values, tokens.mean(1)], dim=-1)
        return (pooled - self.feature_mean) / self.feature_std

    def forward(self, points: torch.Tensor) -> torch.Tensor:
        """``points (B, N, 3)`` -> class logits ``(B, num_classes)``."""
        if self.head_type == "linear-probe":
            return self.head(self.probe_features(points))
        groups = self.backbone.group(points)
        tokens, pos = self.backbone.embed(groups.neighborhoods, groups.centers)
        batch = tokens.shape[0]
        tokens = torch.cat([self.cls_token.expand(batch, -1, -1), tokens], dim=1)
        pos = torch.cat([self.cls_pos.expand(batch, -1, -1), pos], dim=1)
        x, _ = self.backbone.encode(tokens, pos)
        features = torch.cat([x[:, 0], x[:, 1:].max(dim=1).values], dim=-1)  # (B, 2 * dim)
        return self.head(features)


__all__ = ["Cd2pForClassification"]
