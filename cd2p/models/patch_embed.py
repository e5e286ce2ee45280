"""Mini-PointNet patch embedding: one token per point patch (Point-BERT / Point-MAE encoder)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    """Embed neighbourhoods ``(B, G, K, 3)`` into tokens ``(B, G, dim)``.

    Conv1d 3->128, BN, ReLU, Conv1d 128->256; max-pool over the patch; concatenate the pooled
    feature to every point (512); Conv1d 512->512, BN, ReLU, Conv1d 512->dim; max-pool.

    The 512->512 convolution of ``[pooled, x]`` is applied as its two weight halves: the
    pooled half once per patch, the point half per point, summed. Same weights and state dict
    as Point-MAE's (``second_conv.0.weight`` is still ``(512, 512, 1)``), equal outputs up to
    float rounding, and the pooled half's work is not repeated for the K points of a patch
    (about 8 % of a pre-training step).
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.first_conv = nn.Sequential(
            nn.Conv1d(3, 128, 1), nn.BatchNorm1d(128), nn.ReLU(inplace=True), nn.Conv1d(128, 256, 1)
        )
        self.second_conv = nn.Sequential(
            nn.Conv1d(512, 512, 1),
            nn.BatchNorm1d(512),
            nn.ReLU(inplace=True),
            nn.Conv1d(512, dim, 1),
        )

    def forward(self, neighborhoods: torch.Tensor) -> torch.Tensor:
        b, g, k, _ = neighborhoods.shape
        x = neighborhoods.reshape(b * g, k, 3).transpose(1, 2)  # (BG, 3, K)
        x = self.first_conv(x)  # (BG, 256, K)
        pooled = x.max(dim=2, keepdim=True).values  # (BG, 256, 1)
        mix = self.second_conv[0]  # Conv1d(512, 512) over cat([pooled, x]), split in two
        half = pooled.shape[1]
        per_patch = F.conv1d(pooled, mix.weight[:, :half], mix.bias)  # (BG, 512, 1)
        x = F.conv1d(x, mix.weight[:, half:]) + per_patch  # (BG, 512, K)
        x = self.second_conv[1:](x)  # (BG, dim, K)
        return x.max(dim=2).values.view(b, g, self.dim)
