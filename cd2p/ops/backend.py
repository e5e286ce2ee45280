"""Which implementation runs ``fps`` and ``knn``: pure torch (always available), torch-cluster,
or, for FPS on CUDA, one fused Triton kernel.

Chosen with the environment variable ``CD2P_OPS_BACKEND``:

- unset (default): pure PyTorch, except FPS on CUDA tensors, which runs the fused Triton kernel
  (:mod:`cd2p.ops.fps_triton`) once it has been checked to reproduce the torch reference on
  that GPU;
- ``torch``: pure PyTorch everywhere (the reference), no compiled code;
- ``cluster``: torch-cluster's kernels; an error if it is not installed;
- ``auto``: torch-cluster when importable, otherwise the default.
"""

from __future__ import annotations

import importlib.util
import os

BACKENDS = ("torch", "cluster", "auto")
DEFAULT = "default"


def cluster_available() -> bool:
    """True when the optional ``torch_cluster`` extension can be imported."""
    if importlib.util.find_spec("torch_cluster") is None:
        return False
    try:
        import torch_cluster  # noqa: F401
    except Exception:  # a broken build (ABI mismatch) counts as absent
        return False
    return True


def resolve_backend(requested: str | None = None) -> str:
    """Return ``"torch"``, ``"cluster"`` or ``"default"`` for a requested name (default: the
    environment's; ``"default"`` is pure torch with the fused FPS on CUDA)."""
    name = (requested or os.environ.get("CD2P_OPS_BACKEND") or DEFAULT).strip().lower()
    if name not in (*BACKENDS, DEFAULT):
        raise ValueError(f"CD2P_OPS_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "cluster" if cluster_available() else DEFAULT
    if name == "cluster" and not cluster_available():
        raise RuntimeError(
            "CD2P_OPS_BACKEND=cluster but torch_cluster cannot be imported; install it with "
            "`pip install --no-build-isolation 'cd2p[cluster]'` or use CD2P_OPS_BACKEND=torch"
        )
    return name
