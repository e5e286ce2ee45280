"""nn.Modules only: no file I/O happens here except Hub (de)serialisation of weights."""

from cd2p.models.backbone import BackboneOutput, Cd2pBackbone

__all__ = ["BackboneOutput", "Cd2pBackbone"]
