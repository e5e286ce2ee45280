"""Alignment head: map student tokens into the teacher's target space
(docs/method.md#alignment-head).

A two-layer channel MLP (``dim -> out_dim -> out_dim``, GELU) lifts every token to the
teacher's width, then a learned linear map over the token axis mixes ``in_tokens`` tokens into
``out_tokens``. For the paper's objective that is ``(B, 32, 384) -> (B, 10, 768)``, the shape
of ClipCap's semantic prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from cd2p.models.backbone import _init_weights


class AlignmentHead(nn.Module):
    """``(B, in_tokens, dim) -> (B, out_tokens, out_dim)``.

    Args:
        dim: width of the input tokens.
        in_tokens: number of input tokens (32 concepts, or ``G`` backbone tokens).
        out_tokens: number of target tokens (10 prefix tokens, 1 for the CLIP embedding).
        out_dim: target width (768 for the prefix, 512 for CLIP); also the MLP's hidden width.
    """

    def __init__(
        self, dim: int, in_tokens: int = 32, out_tokens: int = 10, out_dim: int = 768
    ) -> None:
        super().__init__()
        self.in_tokens = in_tokens
        self.out_tokens = out_tokens
        self.mlp = nn.Sequential(nn.Linear(dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        self.token_map = nn.Linear(in_tokens, out_tokens)
        self.apply(_init_weights)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """``tokens (B, in_tokens, dim) -> (B, out_tokens, out_dim)``."""
        if tokens.dim() != 3 or tokens.shape[1] != self.in_tokens:
            raise ValueError(
                f"AlignmentHead expects (B, {self.in_tokens}, dim) tokens, "
                f"got {tuple(tokens.shape)}"
            )
        x = self.mlp(tokens)  # (B, in_tokens, out_dim)
        return self.token_map(x.transpose(1, 2)).transpose(1, 2)  # (B, out_tokens, out_dim)
