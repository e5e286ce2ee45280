"""3DETR-style 3D object detection: box encoding, Hungarian matching and the set loss.

Submodules are imported explicitly (``from cd2p.models.detection.boxes import ...``); this
package file imports nothing so that importing it stays cheap.
"""
