"""3D object detection with the cd2p encoder: 3DETR's decoder, queries and heads on top of the
pre-trained point transformer (``Cd2pForDetection``).

Layout (3DETR's ``Model3DETR`` with the cd2p backbone as its encoder):

* encoder: :class:`~cd2p.Cd2pBackbone` tokenizes the scene (``num_groups`` patches, 2048 for
  ScanNet's 40 000 points) and encodes them -> tokens ``(B, G, dim)`` at centers ``(B, G, 3)``;
* ``encoder_to_decoder``: ``Conv1d -> BN -> ReLU`` twice, ``dim -> dim -> decoder_dim``
  (3DETR's ``encoder_to_decoder_projection``);
* queries: ``num_queries`` centers chosen by FPS among the encoder centers; their Fourier
  embedding (random Gaussian features of the coordinates normalised to the scene box,
  :class:`FourierPositionEmbedding`) through ``Conv1d -> ReLU`` twice is the query position;
* decoder: ``decoder_depth`` pre-norm layers (self-attention among queries, cross-attention to
  the encoder tokens with their Fourier positions, ReLU FFN), a shared final LayerNorm applied
  to every layer's output, which is returned for every layer;
* heads, shared by the layers (3DETR's ``GenericMLP``: ``Conv1d -> BN -> ReLU -> Dropout``
  twice, then ``Conv1d``): class logits (C + 1, the last is "no object"), centre offset and
  size; :class:`~cd2p.models.detection.boxes.BoxCoder` turns them into boxes.

Matching, losses and post-processing live outside the model (``matcher.py``, ``criterion.py``,
:mod:`cd2p.engine.detection_eval`), as in DETR.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from cd2p.models.detection.boxes import BoxCoder, normalize_points
from cd2p.models.task_base import Cd2pTaskModel
from cd2p.ops import farthest_point_sample, index_points


def conv_mlp(
    in_dim: int,
    hidden: Sequence[int],
    out_dim: int,
    *,
    norm: bool = True,
    dropout: float | None = None,
    hidden_bias: bool = False,
    out_bias: bool = True,
    out_norm_act: bool = False,
) -> nn.Sequential:
    """3DETR's ``GenericMLP`` with ``use_conv=True`` on ``(B, C, N)``: per hidden width
    ``Conv1d(1x1) [-> BN] -> ReLU [-> Dropout]``, then ``Conv1d`` to ``out_dim``
    (``[-> BN] -> ReLU`` with ``out_norm_act``)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Conv1d(in_dim, width, 1, bias=hidden_bias))
        if norm:
            layers.append(nn.BatchNorm1d(width))
        layers.append(nn.ReLU())
        if dropout is not None:
            layers.append(nn.Dropout(dropout))
        in_dim = width
    layers.append(nn.Conv1d(in_dim, out_dim, 1, bias=out_bias))
    if out_norm_act:
        if norm:
            layers.append(nn.BatchNorm1d(out_dim))
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class FourierPositionEmbedding(nn.Module):
    """3DETR's ``PositionEmbeddingCoordsSine(pos_type="fourier", normalize=True)``.

    Coordinates ``(B, N, 3)`` are normalised to ``[0, 1]`` by the scene box, multiplied by
    ``2 pi`` and projected by a fixed random Gaussian matrix ``(3, dim / 2)`` (a buffer saved
    with the weights); the embedding is ``[sin, cos]`` of the projection, ``(B, N, dim)``.
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        if dim % 2:
            raise ValueError(f"the Fourier embedding needs an even width, got {dim}")
        self.register_buffer("gauss_B", torch.randn(3, dim // 2) * scale)

    def forward(
        self, xyz: torch.Tensor, dims_min: torch.Tensor, dims_max: torch.Tensor
    ) -> torch.Tensor:
        normalized = normalize_points(xyz.float(), dims_min.float(), dims_max.float())
        projected = (2 * math.pi * normalized) @ self.gauss_B
        return torch.cat([projected.sin(), projected.cos()], dim=-1)


class DecoderLayer(nn.Module):
    """3DETR's pre-norm ``TransformerDecoderLayer`` on ``(B, Q, D)`` queries and ``(B, G, D)``
    memory: ``q += SelfAttn(LN(q) + pos_q)``, ``q += CrossAttn(LN(q) + pos_q, memory + pos_m,
    memory)``, ``q += FFN(LN(q))`` (ReLU), dropout after each."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim)
        )
        self.dropout1, self.dropout2 = nn.Dropout(dropout), nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(
        self, queries: torch.Tensor, query_pos: torch.Tensor, memory: torch.Tensor,
        memory_pos: torch.Tensor,
    ) -> torch.Tensor:  # fmt: skip
        x = self.norm1(queries)
        q = x + query_pos
        queries = queries + self.dropout1(self.self_attn(q, q, x, need_weights=False)[0])
        x = self.norm2(queries)
        attended = self.cross_attn(x + query_pos, memory + memory_pos, memory,
                                   need_weights=False)[0]  # fmt: skip
        queries = queries + self.dropout2(attended)
        return queries + self.dropout3(self.ffn(self.norm3(queries)))


class Cd2pForDetection(Cd2pTaskModel, model_kind="detection"):
    """3DETR with the cd2p encoder: ``points (B, N, 3)`` -> boxes of every decoder layer.

    Args:
        backbone: :class:`~cd2p.Cd2pBackbone` constructor arguments (``num_groups``: the
            encoder's patches, 2048 for ScanNet).
        num_classes: object classes (ScanNet: 18); the class head has one more, "no object".
        num_queries: box queries, FPS-sampled among the encoder centers (3DETR: 256).
        decoder_depth, decoder_dim, decoder_heads, decoder_ffn_dim, decoder_dropout: the
            decoder (3DETR: 8, 256, 4, 256, 0.1).
        mlp_dropout: dropout of the box heads (3DETR: 0.3).
        min_scene_scale: floor of the scene extent when decoding sizes (3DETR: 0.1).
        class_names: names of the classes, in label order (kept in ``config.json``).
        num_points: points per scene in training (a recorded hint for evaluation).
    """

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        num_classes: int = 18,
        num_queries: int = 256,
        decoder_depth: int = 8,
        decoder_dim: int = 256,
        decoder_heads: int = 4,
        decoder_ffn_dim: int = 256,
        decoder_dropout: float = 0.1,
        mlp_dropout: float = 0.3,
        min_scene_scale: float = 0.1,
        class_names: Sequence[str] | None = None,
        num_points: int = 40_000,
    ) -> None:
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        super().__init__(backbone)
        if num_queries > self.backbone.num_groups:
            raise ValueError(
                f"num_queries={num_queries} cannot exceed the encoder's "
                f"num_groups={self.backbone.num_groups}"
            )
        self.num_classes = num_classes
        self.num_queries = num_queries
        self.class_names = list(class_names) if class_names is not None else None
        self.num_points = num_points
        enc = self.backbone.dim
        self.encoder_to_decoder = conv_mlp(enc, [enc], decoder_dim, out_bias=False,
                                           out_norm_act=True)  # fmt: skip
        self.pos_embedding = FourierPositionEmbedding(decoder_dim)
        self.query_projection = conv_mlp(decoder_dim, [decoder_dim], decoder_dim, norm=False,
                                         hidden_bias=True, out_norm_act=True)  # fmt: skip
        self.decoder = nn.ModuleList(
            DecoderLayer(decoder_dim, decoder_heads, decoder_ffn_dim, decoder_dropout)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = nn.LayerNorm(decoder_dim)
        for p in self.decoder.parameters():  # 3DETR initialises its decoder so
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        head = dict(hidden=[decoder_dim, decoder_dim], dropout=mlp_dropout)
        self.class_head = conv_mlp(decoder_dim, out_dim=num_classes + 1, **head)
        self.center_head = conv_mlp(decoder_dim, out_dim=3, **head)
        self.size_head = conv_mlp(decoder_dim, out_dim=3, **head)
        self.box_coder = BoxCoder(min_scene_scale=min_scene_scale)

    def forward(
        self,
        points: torch.Tensor,
        dims_min: torch.Tensor | None = None,
        dims_max: torch.Tensor | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """``points (B, N, 3)`` (and the scene box ``dims_min/dims_max (B, 3)``, by default the
        points' own) -> one dict per decoder layer, first to last, each holding
        ``sem_cls_logits (B, Q, C + 1)``, ``center_normalized``, ``center_unnormalized``,
        ``size_normalized``, ``size_unnormalized (B, Q, 3)``, ``query_xyz (B, Q, 3)``,
        ``point_cloud_dims_min/max (B, 3)``."""
        if dims_min is None or dims_max is None:
            dims_min, dims_max = points.amin(dim=1), points.amax(dim=1)
        out = self.backbone(points)
        memory = self.encoder_to_decoder(out.tokens.transpose(1, 2)).transpose(1, 2)
        centers = out.centers
        query_idx = farthest_point_sample(centers.detach(), self.num_queries, validate=False)
        query_xyz = index_points(centers, query_idx)  # (B, Q, 3)
        query_pos = self.query_projection(
            self.pos_embedding(query_xyz, dims_min, dims_max).transpose(1, 2)
        ).transpose(1, 2)
        memory_pos = self.pos_embedding(centers, dims_min, dims_max).to(memory.dtype)
        query_pos = query_pos.to(memory.dtype)
        x = torch.zeros_like(query_pos)
        layers = []
        for layer in self.decoder:
            x = layer(x, query_pos, memory, memory_pos)
            layers.append(self.decoder_norm(x))
        features = torch.stack(layers)  # (L, B, Q, D): the heads run on all layers at once
        depth, batch, queries, dim = features.shape
        flat = features.reshape(depth * batch, queries, dim).transpose(1, 2)
        logits = self.class_head(flat).transpose(1, 2).reshape(depth, batch, queries, -1)
        center = self.center_head(flat).transpose(1, 2).reshape(depth, batch, queries, 3)
        size = self.size_head(flat).transpose(1, 2).reshape(depth, batch, queries, 3)
        outputs = []
        for i in range(depth):
            boxes = self.box_coder.decode(center[i].float(), size[i].float(), query_xyz.float(),
                                          dims_min.float(), dims_max.float())  # fmt: skip
            outputs.append(
                {
                    "sem_cls_logits": logits[i],
                    "center_normalized": boxes["center_normalized"],
                    "center_unnormalized": boxes["center_unnormalized"],
                    "size_normalized": boxes["size_normalized"],
                    "size_unnormalized": boxes["size_unnormalized"],
                    "query_xyz": query_xyz,
                    "point_cloud_dims_min": dims_min,
                    "point_cloud_dims_max": dims_max,
                }
            )
        return outputs


__all__ = ["Cd2pForDetection", "DecoderLayer", "FourierPositionEmbedding", "conv_mlp"]
