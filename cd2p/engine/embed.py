"""``cd2p embed``: pre-trained features of a user's own clouds, for their downstream work.

Each cloud (any file :func:`~cd2p.data.clouds.read_cloud` reads) is reduced to ``num_points``
points by farthest point sampling (deterministic: it starts at the file's first point; a
cloud with fewer points repeats them), normalised as the model's training data was (by
default centred and scaled into the unit sphere, like ModelNet40 / ScanObjectNN), and encoded
by the backbone: a pre-trained :class:`~cd2p.models.backbone.Cd2pBackbone` or the backbone of
any task model. The pooled feature is the max- and mean-pool of the final tokens,
``(2 * dim,)``, exactly what the linear probe reads.

Output: a Hugging Face dataset on disk (``datasets.load_from_disk(OUT)``), one row per cloud:
``file`` (str), ``num_points`` (int32, points in the file), ``pooled`` (``2 * dim`` float32)
and, with ``tokens=True``, ``tokens`` ``(G, dim)`` and ``centers`` ``(G, 3)`` float32.
``OUT/cd2p_embed.json`` records the model, the sampling and the normalisation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from cd2p._atomic import atomic_directory
from cd2p.data.clouds import SUFFIXES, read_cloud
from cd2p.models.backbone import Cd2pBackbone
from cd2p.ops import farthest_point_sample

EMBED_INFO = "cd2p_embed.json"
Normalize = Literal["unit-sphere", "center", "none"]


def backbone_of(model: nn.Module) -> Cd2pBackbone:
    """The backbone of a cd2p model: the model itself, or a task model's ``.backbone``."""
    if isinstance(model, Cd2pBackbone):
        return model
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, Cd2pBackbone):
        raise ValueError(f"{type(model).__name__} has no cd2p backbone to take features from")
    return backbone


def pooled_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """``(B, G, dim)`` tokens -> ``(B, 2 * dim)``: max-pool then mean-pool, concatenated."""
    return torch.cat([tokens.max(1).values, tokens.mean(1)], dim=-1)


def expand_cloud_paths(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given, and every readable cloud file (by suffix, sorted) of a directory."""
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{path}: no point-cloud files ({', '.join(SUFFIXES)})")
            out += found
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{path}: no such file or directory")
    return out


def sample_cloud(points: np.ndarray, num_points: int, normalize: Normalize) -> torch.Tensor:
    """``(N, 3)`` -> ``(num_points, 3)`` float32: FPS from the first point (points repeated when
    fewer), then normalised (``unit-sphere``: centred, largest distance 1; ``center``: centred)."""
    pts = torch.from_numpy(np.ascontiguousarray(points, dtype=np.float32))
    if len(pts) > num_points:
        idx = farthest_point_sample(pts.unsqueeze(0), num_points)[0]
        pts = pts[idx]
    elif len(pts) < num_points:
        pts = pts[torch.arange(num_points) % len(pts)]
    if normalize != "none":
        pts = pts - pts.mean(0, keepdim=True)
    if normalize == "unit-sphere":
        pts = pts / pts.norm(dim=1).max().clamp_min(1e-12)
    return pts


@dataclass
class EmbedResult:
    """What :func:`embed_clouds` wrote."""

    out: Path
    clouds: int
    feature_dim: int
    tokens: bool


@torch.no_grad()
def embed_clouds(
    model: nn.Module,
    paths: Sequence[str | Path],
    out: str | Path,
    *,
    num_points: int | None = None,
    tokens: bool = False,
    normalize: Normalize = "unit-sphere",
    batch_size: int = 16,
    model_name: str = "",
    progress: Callable[[int], None] | None = None,
) -> EmbedResult:
    """Encode every cloud of ``paths`` and write the features as a dataset at ``out``.

    ``num_points`` defaults to the model's own (a task model's ``num_points``), else 1024.
    Every file is read and checked before anything is encoded; ``out`` is written atomically
    and must not exist yet (or be empty).
    """
    from datasets import Array2D, Dataset, Features, List, Value

    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f"{out} already exists and is not empty; choose a new --out")
    backbone = backbone_of(model).eval()
    device = next(backbone.parameters()).device
    n = num_points or getattr(model, "num_points", None) or 1024
    files = expand_cloud_paths(paths)
    clouds = [read_cloud(p) for p in files]  # every bad file is reported before any work
    sizes = [len(c) for c in clouds]
    pooled, token_rows, center_rows = [], [], []
    for start in range(0, len(clouds), batch_size):
        chunk = clouds[start : start + batch_size]
        batch = torch.stack([sample_cloud(c.points, n, normalize) for c in chunk]).to(device)
        output = backbone(batch)
        feats = output.tokens.float()
        pooled.append(pooled_tokens(feats).cpu())
        if tokens:
            token_rows += list(feats.cpu().numpy())
            center_rows += list(output.centers.float().cpu().numpy())
        if progress is not None:
            progress(len(chunk))
    features = torch.cat(pooled).numpy()
    if not np.isfinite(features).all():
        raise FloatingPointError("the backbone produced non-finite features; nothing written")
    dim = backbone.dim
    columns = {
        "file": [str(p) for p in files],
        "num_points": sizes,
        "pooled": list(features),
    }
    schema = {
        "file": Value("string"),
        "num_points": Value("int32"),
        "pooled": List(Value("float32"), length=2 * dim),
    }
    if tokens:
        groups = backbone.num_groups
        columns |= {"tokens": token_rows, "centers": center_rows}
        schema |= {
            "tokens": Array2D((groups, dim), "float32"),
            "centers": Array2D((groups, 3), "float32"),
        }
    dataset = Dataset.from_dict(columns, features=Features(schema))
    with atomic_directory(out) as tmp:
        dataset.save_to_disk(str(tmp))
        (tmp / EMBED_INFO).write_text(json.dumps({
            "model": model_name,
            "model_kind": getattr(model, "model_kind", "backbone"),
            "backbone": {"dim": dim, "depth": backbone.depth, "num_groups": backbone.num_groups,
                         "group_size": backbone.group_size},
            "num_points": n,
            "sampling": "farthest point sampling from the first point",
            "normalize": normalize,
            "pooled": "max-pool then mean-pool of the final tokens (2 x dim)",
            "tokens": tokens,
            "clouds": len(files),
        }, indent=1))  # fmt: skip
    return EmbedResult(out, len(files), 2 * dim, tokens)


__all__ = [
    "EMBED_INFO",
    "EmbedResult",
    "backbone_of",
    "embed_clouds",
    "expand_cloud_paths",
    "pooled_tokens",
    "sample_cloud",
]
