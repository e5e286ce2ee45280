"""What every task model shares: a :class:`Cd2pBackbone` built from its saved config, the
start from a pre-trained backbone's weights, the Hub mixin, and the optimiser's view of which
parameters take no weight decay."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

from torch import nn

from cd2p.models.backbone import Cd2pBackbone
from cd2p.models.hub import Cd2pHubMixin

M = TypeVar("M", bound="Cd2pTaskModel")

# Per-task settings of the backbone that a task may change on top of a pre-trained one (the
# weights do not depend on them); everything else comes from the pre-trained backbone.
PER_TASK_BACKBONE_KEYS = ("num_groups", "group_size", "drop_path_rate")


def backbone_config(backbone: Cd2pBackbone, **overrides: Any) -> dict[str, Any]:
    """The constructor arguments of ``backbone`` (as saved in its ``config.json``), updated
    with ``overrides`` (e.g. the task's ``num_groups``)."""
    config = dict(getattr(backbone, "_hub_mixin_config", None) or {})
    config.pop("model_kind", None)
    config.update({k: v for k, v in overrides.items() if v is not None})
    return config


def mlp_head(
    in_dim: int, hidden: Sequence[int], out_dim: int, dropout: float, norm: bool = True
) -> nn.Sequential:
    """``Linear -> BN -> ReLU -> Dropout`` for every hidden width, then a final ``Linear``
    (Point-MAE's head); ``norm=False`` leaves the BatchNorms out (Point-BERT's head)."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers.append(nn.Linear(in_dim, width))
        if norm:
            layers.append(nn.BatchNorm1d(width))
        layers += [nn.ReLU(inplace=True), nn.Dropout(dropout)]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


def point_mlp(in_channels: int, widths: Sequence[int]) -> nn.Sequential:
    """Shared per-point ``Conv1d(1x1) -> BN -> ReLU`` layers on ``(B, C, N)``."""
    layers: list[nn.Module] = []
    for width in widths:
        layers += [nn.Conv1d(in_channels, width, 1), nn.BatchNorm1d(width), nn.ReLU(inplace=True)]
        in_channels = width
    return nn.Sequential(*layers)


class Cd2pTaskModel(nn.Module, Cd2pHubMixin):
    """Base of the task models: ``self.backbone`` is a :class:`Cd2pBackbone` built from the
    ``backbone`` constructor argument (its ``config.json`` entry), and :meth:`from_backbone`
    starts a new task model from a pre-trained backbone's weights (the heads are new).

    Subclasses pass ``model_kind=<task name>`` and call ``super().__init__(backbone)`` first.
    """

    backbone: Cd2pBackbone

    def __init__(self, backbone: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = Cd2pBackbone(**(backbone or {}))

    @classmethod
    def from_backbone(
        cls: type[M],
        pretrained: Cd2pBackbone,
        backbone_overrides: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> M:
        """A task model whose backbone starts from ``pretrained``'s weights.

        ``backbone_overrides`` changes per-task settings of the backbone (``num_groups``,
        ``group_size``, ``drop_path_rate``); ``kwargs`` go to the constructor.
        """
        unknown = set(backbone_overrides or {}) - set(PER_TASK_BACKBONE_KEYS)
        if unknown:
            raise ValueError(
                f"a task may only change {', '.join(PER_TASK_BACKBONE_KEYS)} of a pre-trained "
                f"backbone, not {', '.join(sorted(unknown))}"
            )
        config = backbone_config(pretrained, **(backbone_overrides or {}))
        model = cls(backbone=cls.task_backbone_config(config), **kwargs)
        model.adopt_backbone_weights(pretrained.state_dict())
        return model

    @classmethod
    def build(
        cls: type[M],
        pretrained: Cd2pBackbone | None,
        backbone_settings: dict[str, Any],
        **kwargs: Any,
    ) -> M:
        """A new task model for a recipe whose ``model`` section is ``backbone_settings``: it
        starts from ``pretrained``'s weights with the recipe's per-task settings
        (:data:`PER_TASK_BACKBONE_KEYS`), or, without ``pretrained``, from scratch with all of
        them. ``kwargs`` go to the constructor."""
        if pretrained is None:
            return cls(backbone=dict(backbone_settings), **kwargs)
        per_task = {key: backbone_settings[key] for key in PER_TASK_BACKBONE_KEYS}
        return cls.from_backbone(pretrained, per_task, **kwargs)

    @classmethod
    def task_backbone_config(cls, pretrained_config: dict[str, Any]) -> dict[str, Any]:
        """The backbone settings of a task model started from a backbone with
        ``pretrained_config`` (the same, unless the task reshapes the backbone)."""
        return pretrained_config

    def adopt_backbone_weights(self, state: dict[str, Any]) -> None:
        """Load a pre-trained backbone's state dict (strictly) into this model."""
        self.backbone.load_state_dict(state, strict=True)

    @property
    def backbone_settings(self) -> dict[str, Any]:
        """The backbone's constructor arguments (what ``config.json`` records under
        ``backbone``)."""
        return dict((self._hub_mixin_config or {}).get("backbone") or {})


__all__ = [
    "PER_TASK_BACKBONE_KEYS",
    "Cd2pTaskModel",
    "backbone_config",
    "mlp_head",
    "point_mlp",
]
