"""cd2p: 3D point-cloud pre-training by distilling knowledge from 2D images."""

__version__ = "0.1.0"

from cd2p.models.backbone import BackboneOutput, Cd2pBackbone  # noqa: E402

__all__ = ["BackboneOutput", "Cd2pBackbone", "__version__"]
