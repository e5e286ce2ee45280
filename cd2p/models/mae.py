"""Point-MAE masked point modelling: random patch masking, decoder, Chamfer-L2 loss.

The ``mae`` objective of docs/method.md#mae (Pang et al., "Masked Autoencoders for Point Cloud
Self-supervised Learning", 2022):

1. hide ``round(ratio * G)`` of the ``G`` patches of every cloud at random (:func:`random_mask`);
2. the backbone encodes the **visible** patches only (tokens + positional embeddings of their
   centers);
3. :class:`MaeDecoder` appends a learned mask token for every hidden patch (placed by its
   center's positional embedding), runs a few transformer blocks and predicts the ``K x 3``
   coordinates of each hidden patch, relative to its center;
4. :func:`reconstruction_loss` is the Chamfer-L2 distance between predicted and true patches.

Parameter names follow Point-MAE's (``mask_token``, ``decoder_pos_embed``, ``blocks.i``,
``norm``, ``increase_dim.0``), so its decoder converts by renaming prefixes.
"""

from __future__ import annotations

import torch
from torch import nn

from cd2p.models.backbone import _init_weights
from cd2p.models.blocks import Block
from cd2p.ops import chamfer_distance, index_points


def num_masked(num_groups: int, ratio: float) -> int:
    """Patches hidden per cloud: ``round(ratio * num_groups)``, at least 1 and at most ``G - 1``."""
    count = round(ratio * num_groups)
    if not 0 < count < num_groups:
        raise ValueError(
            f"mask ratio {ratio} hides {count} of {num_groups} patches; "
            "at least one patch must be hidden and at least one visible"
        )
    return count


def random_mask(
    batch: int,
    num_groups: int,
    ratio: float,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw an independent random patch mask for every cloud.

    Exactly ``round(ratio * num_groups)`` patches are hidden per cloud (Point-MAE's ``rand``
    mask). Randomness comes from ``generator`` or, when ``None``, the global RNG of ``device``,
    so seeded runs are reproducible.

    Returns:
        visible_idx: ``(B, G - M)`` int64 patch indices kept for the encoder, increasing.
        masked_idx: ``(B, M)`` int64 indices of the hidden patches, increasing.
    """
    m = num_masked(num_groups, ratio)
    noise = torch.rand(batch, num_groups, device=device, generator=generator)
    order = noise.argsort(dim=1)  # a random permutation per cloud
    masked_idx = order[:, :m].sort(dim=1).values
    visible_idx = order[:, m:].sort(dim=1).values
    return visible_idx, masked_idx


def gather_patches(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Select patches: ``x (B, G, *F)`` with ``idx (B, S)`` -> ``(B, S, *F)``."""
    b, g = x.shape[:2]
    feature_shape = x.shape[2:]
    return index_points(x.reshape(b, g, -1), idx).view(b, idx.shape[1], *feature_shape)


class MaeDecoder(nn.Module):
    """Point-MAE decoder: visible tokens + mask tokens -> coordinates of the hidden patches.

    Args:
        dim: token width (the backbone's).
        group_size: ``K``, points predicted per hidden patch.
        depth: decoder blocks (4 in Point-MAE).
        num_heads: attention heads (6 in Point-MAE).
        mlp_ratio: block MLP width relative to ``dim``.
        drop_path_rate: stochastic depth of the last block, linear from 0 (0.1 in Point-MAE).
    """

    def __init__(
        self,
        dim: int,
        group_size: int,
        depth: int = 4,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.group_size = group_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.decoder_pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        rates = torch.linspace(0.0, drop_path_rate, depth).tolist() if depth > 1 else [0.0]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.increase_dim = nn.Sequential(nn.Conv1d(dim, 3 * group_size, 1))
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.mask_token, std=0.02)

    def forward(
        self, visible: torch.Tensor, visible_centers: torch.Tensor, masked_centers: torch.Tensor
    ) -> torch.Tensor:
        """Predict the hidden patches.

        Args:
            visible: ``(B, V, dim)`` encoder output for the visible patches.
            visible_centers: ``(B, V, 3)`` their centers.
            masked_centers: ``(B, M, 3)`` centers of the hidden patches.

        Returns:
            ``(B, M, K, 3)`` predicted coordinates, relative to each hidden patch's center.
        """
        b, m = masked_centers.shape[:2]
        x = torch.cat([visible, self.mask_token.expand(b, m, -1)], dim=1)  # (B, V + M, dim)
        pos = self.decoder_pos_embed(torch.cat([visible_centers, masked_centers], dim=1))
        for block in self.blocks:
            x = block(x + pos)
        x = self.norm(x[:, -m:])  # only the mask tokens are decoded
        out = self.increase_dim(x.transpose(1, 2)).transpose(1, 2)  # (B, M, 3K)
        return out.reshape(b, m, self.group_size, 3)


def reconstruction_loss(predicted: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Chamfer-L2 between predicted and true patches, averaged over all hidden patches.

    Args:
        predicted: ``(B, M, K, 3)``.
        target: ``(B, M, K', 3)`` true neighbourhoods relative to their centers.

    Returns:
        a scalar, computed in fp32 even under autocast (squared distances of small relative
        coordinates lose most of their digits in bf16).
    """
    if predicted.shape[:2] != target.shape[:2]:
        raise ValueError(
            f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} patches differ"
        )
    b, m = predicted.shape[:2]
    with torch.autocast(device_type=predicted.device.type, enabled=False):
        return chamfer_distance(
            predicted.float().reshape(b * m, -1, 3), target.float().reshape(b * m, -1, 3)
        )
