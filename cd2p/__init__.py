"""cd2p: 3D point-cloud pre-training by distilling knowledge from 2D images.

The public API is imported lazily, so that ``import cd2p`` (and every ``cd2p`` command,
DataLoader worker and preparation process) does not pay for importing torch until it is used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "BackboneOutput": "cd2p.models.backbone",
    "Cd2pBackbone": "cd2p.models.backbone",
    "Cd2pForClassification": "cd2p.models.classification",
    "Cd2pForDetection": "cd2p.models.detection.detector",
    "Cd2pForPartSegmentation": "cd2p.models.partseg",
    "Cd2pForSemanticSegmentation": "cd2p.models.segmentation",
    "Cd2pStudent": "cd2p.models.student",
    "StudentOutput": "cd2p.models.student",
    "from_pretrained": "cd2p.hub",
}

__all__ = [
    "BackboneOutput",
    "Cd2pBackbone",
    "Cd2pForClassification",
    "Cd2pForDetection",
    "Cd2pForPartSegmentation",
    "Cd2pForSemanticSegmentation",
    "Cd2pStudent",
    "StudentOutput",
    "__version__",
    "from_pretrained",
]

if TYPE_CHECKING:
    from cd2p.hub import from_pretrained
    from cd2p.models.backbone import BackboneOutput, Cd2pBackbone
    from cd2p.models.classification import Cd2pForClassification
    from cd2p.models.detection.detector import Cd2pForDetection
    from cd2p.models.partseg import Cd2pForPartSegmentation
    from cd2p.models.segmentation import Cd2pForSemanticSegmentation
    from cd2p.models.student import Cd2pStudent, StudentOutput


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'cd2p' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
