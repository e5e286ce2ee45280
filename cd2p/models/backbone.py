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
    class_token: ``(B, dim)``, the class token after the final LayerNorm, for a backbone built
        with ``class_token=True`` (Point-BERT's encoder); ``None`` otherwise.
    """

    tokens: torch.Tensor
    centers: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    class_token: torch.Tensor | None = None


class Cd2pBackbone(
    nn.Module,
    Cd2pHubMixin,
    model_kind="backbone",
    optional_config={"patch_dim": None, "class_token": False},
):
    """Point transformer encoder: FPS + kNN tokenizer, mini-PointNet patches, pre-norm blocks.

    Args:
        dim: token width.
        depth: number of transformer blocks.
        num_heads: attention heads.
        num_groups: ``G``, patches per cloud (FPS centers).
        group_size: ``K``, points per patch (kNN).
        mlp_ratio: hidden width of the block MLPs relative to ``dim``.
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
        patch_dim: Point-BERT's patch embedding: the mini-PointNet outputs ``patch_dim``
            channels and a ``reduce_dim`` Linear maps them to ``dim`` after the max-pool.
            ``None`` (the default, Point-MAE and cd2p): the mini-PointNet outputs ``dim``.
        class_token: Point-BERT's pre-trained encoder: a learnable class token (``cls_token``,
            with its own position ``cls_pos``) is prepended to the patch tokens in
            :meth:`encode`; it is returned separately and never among the patch tokens.

    Parameter names follow Point-MAE's encoder (``encoder.first_conv``, ``pos_embed``,
    ``blocks.i.attn.qkv``, ``norm``), so its checkpoints convert by renaming prefixes. The two
    optional parts are off by default; then neither their weights nor their settings appear
    in the state dict or in ``config.json``.
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
        patch_dim: int | None = None,
        class_token: bool = False,
    ) -> None:
        super().__init__()
        from cd2p.config import ModelConfig, check_fields

        # The recipe's rules (ranges, heads dividing dim) hold for any way a backbone is made.
        check_fields(ModelConfig, {"dim": dim, "depth": depth, "num_heads": num_heads,
                                   "num_groups": num_groups, "group_size": group_size,
                                   "mlp_ratio": mlp_ratio, "drop_path_rate": drop_path_rate},
                     "Cd2pBackbone")  # fmt: skip
        if patch_dim is not None and patch_dim < 1:
            raise ValueError(f"Cd2pBackbone.patch_dim must be >= 1, got {patch_dim}")
        self.dim = dim
        self.depth = depth
        self.num_heads = num_heads
        self.num_groups = num_groups
        self.group_size = group_size
        self.patch_dim = patch_dim
        self.class_token = class_token
        self.encoder = PatchEmbed(patch_dim or dim)
        if patch_dim is not None:
            self.reduce_dim = nn.Linear(patch_dim, dim)
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
            self.cls_pos = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Sequential(nn.Linear(3, 128), nn.GELU(), nn.Linear(128, dim))
        rates = torch.linspace(0.0, drop_path_rate, depth).tolist() if depth > 1 else [0.0]
        self.blocks = nn.ModuleList(Block(dim, num_heads, mlp_ratio, r) for r in rates)
        self.norm = nn.LayerNorm(dim)
        self.apply(_init_weights)
        if class_token:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
            nn.init.trunc_normal_(self.cls_pos, std=0.02)

    def no_weight_decay(self) -> set[str]:
        """Parameters the optimiser must not decay: the optional class token and position."""
        return {"cls_token", "cls_pos"} if self.class_token else set()

    def group(self, points: torch.Tensor, random_start: bool = False) -> Groups:
        """Tokenize geometry: ``points (B, N, 3)`` -> neighbourhoods ``(B, G, K, 3)`` + centers.

        The coordinates are not checked for NaN here (that would synchronise the device in
        every training step): readers, datasets and commands validate data where it enters.
        """
        return group_points(points, self.num_groups, self.group_size, random_start=random_start,
                            validate=False)

    def embed(self, neighborhoods: torch.Tensor, centers: torch.Tensor):
        """Patch tokens ``(B, G, dim)`` and positional embeddings ``(B, G, dim)``."""
        tokens = self.encoder(neighborhoods)
        if self.patch_dim is not None:
            tokens = self.reduce_dim(tokens)  # Point-BERT: (B, G, patch_dim) -> (B, G, dim)
        return tokens, self.pos_embed(centers)

    def encode(
        self, tokens: torch.Tensor, pos: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """Run the blocks; ``pos`` is added before every block. ``(B, T, dim)`` in and out.

        Returns the final-normed tokens and, on request, each block's output. With
        ``class_token`` the class token runs through the blocks in front of the tokens (so it
        changes them through attention) but is left out of both results; see
        :meth:`encode_with_class_token`.
        """
        _, x, hidden = self.encode_with_class_token(tokens, pos, output_hidden_states)
        return x, hidden

    def encode_with_class_token(
        self, tokens: torch.Tensor, pos: torch.Tensor, output_hidden_states: bool = False
    ) -> tuple[torch.Tensor | None, torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """:meth:`encode`, also returning the final-normed class token ``(B, dim)`` (``None``
        for a backbone without one)."""
        prefix = 0
        if self.class_token:
            batch = tokens.shape[0]
            tokens = torch.cat([self.cls_token.expand(batch, -1, -1).to(tokens.dtype), tokens], 1)
            pos = torch.cat([self.cls_pos.expand(batch, -1, -1).to(pos.dtype), pos], 1)
            prefix = 1
        hidden = []
        x = tokens
        for block in self.blocks:
            x = block(x + pos)
            if output_hidden_states:
                hidden.append(x[:, prefix:])
        x = self.norm(x)
        cls = x[:, 0] if prefix else None
        return cls, x[:, prefix:], (tuple(hidden) if output_hidden_states else None)

    def forward(self, points: torch.Tensor, output_hidden_states: bool = False) -> BackboneOutput:
        """Encode ``points (B, N, 3)`` into ``num_groups`` tokens."""
        groups = self.group(points)
        tokens, pos = self.embed(groups.neighborhoods, groups.centers)
        cls, tokens, hidden = self.encode_with_class_token(tokens, pos, output_hidden_states)
        return BackboneOutput(
            tokens=tokens, centers=groups.centers, hidden_states=hidden, class_token=cls
        )


def _init_weights(m: nn.Module) -> None:
    # Point-MAE's initialisation: truncated normal linears, unit LayerNorms.
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
