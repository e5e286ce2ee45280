"""Which implementation runs ``fps`` and ``knn``: pure torch (always available) or torch-cluster.

Chosen with the environment variable ``CD2P_OPS_BACKEND``:

- ``torch`` (default): pure PyTorch, CPU and CUDA, no compiled extension.
- ``cluster``: torch-cluster's kernels; an error if it is not installed.
- ``auto``: torch-cluster when importable, otherwise torch.
"""

from __future__ import annotations

import importlib.util
import os

BACKENDS = ("torch", "cluster", "auto")


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
    """Return ``"torch"`` or ``"cluster"`` for a requested name (default: the environment's)."""
    name = (requested or os.environ.get("CD2P_OPS_BACKEND") or "torch").strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"CD2P_OPS_BACKEND must be one of {', '.join(BACKENDS)}, got {name!r}")
    if name == "auto":
        return "cluster" if cluster_available() else "torch"
    if name == "cluster" and not cluster_available():
        raise RuntimeError(
            "CD2P_OPS_BACKEND=cluster but torch_cluster cannot be imported; install it with "
            "`pip install --no-build-isolation 'cd2p[cluster]'` or use CD2P_OPS_BACKEND=torch"
        )
    return name
