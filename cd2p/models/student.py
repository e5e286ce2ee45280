"""The whole pre-trained student (``Cd2pStudent``, Hub model kind ``student``): the backbone,
the concept extractor and the alignment head(s), exported beside ``RUN/backbone`` by
``cd2p pretrain`` (or from a run's last checkpoint by ``cd2p export``).

Where ``Cd2pBackbone`` gives features for fine-tuning, the student gives what it learned to
predict from a point cloud alone (docs/method.md#the-exported-student):

* the semantic prefix ``(B, 10, 768)`` that ClipCap's GPT-2 turns into a caption
  (``cd2p caption``), for the ``distill``, ``distill-no-concept``, ``mae+distill`` and
  ``distill+clip`` objectives;
* the 512-d CLIP image embedding ``(B, 512)`` that zero-shot classification compares with CLIP
  text embeddings (``cd2p zeroshot``), for ``distill+clip`` (its second head) and
  ``distill-clip``.

Its parameter names are those of :class:`~cd2p.models.distill.Cd2pPretrainModel` (``backbone``,
``concepts``, ``align``, ``clip_head``), so a pre-training checkpoint loads into it by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from cd2p.models.backbone import Cd2pBackbone
from cd2p.models.distill import STUDENT_OUTPUTS, build_student_heads, student_outputs
from cd2p.models.hub import Cd2pHubMixin


@dataclass
class StudentOutput:
    """What :class:`Cd2pStudent` predicts for a batch of clouds.

    prefix: ``(B, 10, 768)`` semantic prefix (``None`` when the objective has none).
    clip_embedding: ``(B, 512)`` predicted CLIP image embedding, un-normalised (``None`` when
        the objective has none).
    """

    prefix: torch.Tensor | None = None
    clip_embedding: torch.Tensor | None = None


class Cd2pStudent(nn.Module, Cd2pHubMixin, model_kind="student"):
    """Backbone + concept extractor + alignment head(s): ``points (B, N, 3)`` ->
    :class:`StudentOutput`.

    Args:
        backbone: :class:`Cd2pBackbone` constructor arguments.
        objective: the pre-training objective it was trained with (decides its heads and
            outputs, see :data:`~cd2p.models.distill.STUDENT_OUTPUTS`); not ``mae``.
        num_concepts: concept queries (32).
        prefix_tokens, prefix_dim: the prefix's shape (10, 768).
        clip_dim: the CLIP embedding's width (512).
        num_points: points per cloud in pre-training (``data.num_points``).
        voxel_size: the voxel grid the pre-training pairs were evened with (metres; ``None``
            when unknown or absent).

    ``num_points`` and ``voxel_size`` describe the input pre-training saw;
    :meth:`prepare_points` and :meth:`encode` apply them to a raw cloud.
    """

    def __init__(
        self,
        backbone: dict[str, Any] | None = None,
        objective: str = "distill",
        num_concepts: int = 32,
        prefix_tokens: int = 10,
        prefix_dim: int = 768,
        clip_dim: int = 512,
        num_points: int = 4096,
        voxel_size: float | None = 0.02,
    ) -> None:
        super().__init__()
        if not STUDENT_OUTPUTS.get(objective):
            raise ValueError(
                f"objective {objective!r} has no student (choose one of "
                f"{', '.join(k for k, v in STUDENT_OUTPUTS.items() if v)})"
            )
        config = dict(backbone or {})
        self.backbone = Cd2pBackbone(**config)
        self.objective = objective
        self.num_points = num_points
        self.voxel_size = voxel_size
        self.prefix_dim = prefix_dim
        mlp_ratio = float(config.get("mlp_ratio", 4.0))
        self.concepts, self.align, self.clip_head = build_student_heads(
            self.backbone, objective, num_concepts, prefix_tokens, prefix_dim, clip_dim, mlp_ratio
        )

    @property
    def outputs(self) -> tuple[str, ...]:
        """What this student predicts: ``"prefix"`` and/or ``"clip"``."""
        return STUDENT_OUTPUTS[self.objective]

    def forward(self, points: torch.Tensor) -> StudentOutput:
        """``points (B, N, 3)`` (prepared as in pre-training, see :meth:`prepare_points`) ->
        prefix ``(B, 10, 768)`` and/or CLIP embedding ``(B, 512)``."""
        groups = self.backbone.group(points)
        tokens, pos = self.backbone.embed(groups.neighborhoods, groups.centers)
        out = student_outputs(self, tokens, pos)
        clip = out.get("clip")
        return StudentOutput(
            prefix=out.get("prefix"), clip_embedding=None if clip is None else clip[:, 0]
        )

    def prepare_points(self, cloud: np.ndarray | torch.Tensor, seed: int = 0) -> torch.Tensor:
        """A raw cloud ``(N, 3)`` (metres, z up, as ScanNet) -> the ``(num_points, 3)`` input
        pre-training would have made of it: voxel grid, ``num_points`` drawn (seeded), centred
        (:func:`cd2p.data.clouds.pretraining_view`)."""
        from cd2p.data.clouds import pretraining_view

        array = cloud.detach().cpu().numpy() if isinstance(cloud, torch.Tensor) else cloud
        view = pretraining_view(array, self.num_points, self.voxel_size, seed)
        return torch.from_numpy(view)

    @torch.no_grad()
    def encode(
        self,
        clouds: Sequence[np.ndarray | torch.Tensor],
        batch_size: int = 16,
        seed: int = 0,
    ) -> StudentOutput:
        """Raw clouds (each ``(N_i, 3)``) -> their predictions, on the model's device, in
        batches; each cloud is prepared with :meth:`prepare_points` (seed ``seed + i``)."""
        device = next(self.parameters()).device
        prefixes, clips = [], []
        for start in range(0, len(clouds), batch_size):
            batch = torch.stack(
                [
                    self.prepare_points(cloud, seed + start + i)
                    for i, cloud in enumerate(clouds[start : start + batch_size])
                ]
            ).to(device)
            out = self(batch)
            if out.prefix is not None:
                prefixes.append(out.prefix.float().cpu())
            if out.clip_embedding is not None:
                clips.append(out.clip_embedding.float().cpu())
        return StudentOutput(
            prefix=torch.cat(prefixes) if prefixes else None,
            clip_embedding=torch.cat(clips) if clips else None,
        )


__all__ = ["Cd2pStudent", "StudentOutput"]
