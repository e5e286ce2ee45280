"""The cd2p student: a Point-MAE-style point transformer (``Cd2pBackbone``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from cd2p.models.blocks import Block
from cd2p.models.hub import Cd2pHubMixin
from cd2p.models.patch_embed import PatchEmbed
from cd2p.ops import Groups, group_points


@dataclass
class BackboneOutput:
    """What :meth:`Cd2pBackbone.forward` returns.

    tokens: ``(B, G, dim)`` after the final LayerNorm.
    centers: ``(B, G, 3)`` patch centers.
    hidden_states: ``depth`` tensors ``(B, G, dim)``, the output of every block before the final
        norm (only when ``output_hidden_states=True``).
    """

    tokens: torch.Tensor
    centers: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None


class Cd2pBackbone(nn.Module, Cd2pHubMixin, model_kind="backbone"):
    """Point transformer encoder: FPS + kNN tokenizer, mini-PointNet patches, pre-norm blocks.

    Args:
        dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads.
        num_groups: ``G``, patches per cloud (FPS centers).
        group_size: ``K``, points per patch (kNN).
        mlp_ratio: hidden width of the block MLPs relative to ``dim``.
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).

    Parameter names follow Point-MAE's encoder (``encoder.first_conv``, ``pos_embed``,
    ``blocks.i.attn.qkv``, ``norm``), so its checkpoints convert by renaming prefixes.
    """

    def __init__(
        self,
        dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        num_groups: int = 64,
        group_size: int = 32,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.group_size = group_size
        self.encoder = PatchEmbed(dim)
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        rates = torch.linspace(0.0, drop_path_rate, depth).tolist() if depth > 1 else [0.0]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)

    def group(self, points: torch.Tensor, random_start: bool = False) -> Groups:
        """Tokenize geometry: ``points (B, N, 3)`` -> neighbourhoods ``(B, G, K, 3)`` + centers.

        The coordinates are not checked for NaN here (that would synchronise the device in
        every training step): readers, datasets and commands validate data where it enters.
        """
        return group_points(points, self.num_groups, self.group_size, random_start=random_start,
                            validate=False)

    def embed(self, neighborhoods: torch.Tensor, centers: torch.Tensor):
        """Patch tokens ``(B, G, dim)`` and positional embeddings ``(B, G, dim)``."""
        return self.encoder(neighborhoods), self.pos_embed(centers)

    def encode(
        self, tokens: torch.Tensor, pos: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the blocks; ``pos`` is added before every block. ``(B, T, dim)`` in and out.

        Returns the final-normed tokens and, on request, each block's output.
        """
        hidden = []
        x = tokens
        for block in self.blocks:
            x = block(x + pos)
            if output_hidden_states:
                hidden.append(x)
        return self.norm(x), (tuple(hidden) if output_hidden_states else None)

    def forward(self, points: torch.Tensor, output_hidden_states: bool = False) -> BackboneOutput:
        """Encode ``points (B, N, 3)`` into ``num_groups`` tokens."""
        groups = self.group(points)
        tokens, pos = self.embed(groups.neighborhoods, groups.centers)
        tokens, hidden = self.encode(tokens, pos, output_hidden_states)
        return BackboneOutput(tokens=tokens, centers=groups.centers, hidden_states=hidden)


def _init_weights(m: nn.Module) -> None:
    # Point-MAE's initialisation: truncated normal linears, unit LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
