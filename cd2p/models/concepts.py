"""Concept extraction: 32 learnable queries that read every layer of the student
(docs/method.md#concept-extraction).

One pre-norm cross-attention block, with **one set of weights shared by all layers**, is applied
after every backbone block ``i = 1..depth``::

    C_0 = queries                      (Q, dim), learnable
    C_i = CrossBlock(C_{i-1}, F_i)     F_i = hidden state after block i, (B, T, dim)
    concepts = LayerNorm(C_depth)      (B, Q, dim)

Sharing the block keeps the extractor's size independent of the backbone's depth (one block,
not ``depth`` blocks) and forces every layer's features into the same concept space.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cd2p.models.backbone import _init_weights
from cd2p.models.blocks import CrossBlock


class ConceptExtractor(nn.Module):
    """Distil a backbone's hidden states into ``num_concepts`` concept tokens.

    Args:
        dim: width of the backbone tokens and of the concepts.
        num_concepts: ``Q``, number of learnable concept queries (32 in the paper).
        num_heads: cross-attention heads.
        mlp_ratio: hidden width of the block's FFN relative to ``dim``.

    The output passes through a final LayerNorm: the residual stream grows over the ``depth``
    applications of the block, and the alignment head (and, for captioning, ClipCap's prefix
    space) is better served by tokens of a fixed scale, as the backbone's own final norm does
    for its tokens.
    """

    def __init__(
        self, dim: int, num_concepts: int = 32, num_heads: int = 6, mlp_ratio: float = 4.0
    ) -> None:
        super().__init__()
        self.dim = dim
        self.num_concepts = num_concepts
        self.queries = nn.Parameter(torch.empty(num_concepts, dim))
        self.block = CrossBlock(dim, num_heads, mlp_ratio)  # one block, reused for every layer
        self.norm = nn.LayerNorm(dim)
        nn.init.trunc_normal_(self.queries, std=0.02)
        self.apply(_init_weights)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """``depth`` hidden states, each ``(B, T, dim)`` -> concept tokens ``(B, Q, dim)``."""
        if len(hidden_states) == 0:
            raise ValueError("ConceptExtractor needs at least one hidden state")
        first = hidden_states[0]
        if first.dim() != 3 or first.shape[-1] != self.dim:
            raise ValueError(
                f"hidden states must have shape (B, T, {self.dim}), got {tuple(first.shape)}"
            )
        concepts = self.queries.unsqueeze(0).expand(first.shape[0], -1, -1)
        for features in hidden_states:
            concepts = self.block(concepts, features)
        return self.norm(concepts)
