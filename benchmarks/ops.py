"""Time farthest point sampling and kNN at the sizes cd2p uses, before and after, in one run.

    python benchmarks/ops.py [--repeats 3] [--device cpu|cuda|all] [--threads T]

Rows: B x N -> M (kNN takes K = 32 neighbours of the M centers among the N points).
Columns, milliseconds per call:

* ``before``: the previous implementation, kept here as the baseline: inputs checked for NaN on
  every call (a device sync), the pure-torch FPS loop, and kNN rebuilding the points' augmented
  coordinates for every chunk of queries;
* ``now``: what models call: no NaN check in the hot path (data is validated where it enters),
  kNN building them once per call, and FPS as one fused Triton kernel on CUDA;
* ``cluster``: torch-cluster's kernels, when installed;

and ``before / now``.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from cd2p.ops import cluster_available, farthest_point_sample, knn, square_distance

SIZES = [(32, 1024, 64), (128, 4096, 64), (16, 8192, 256), (8, 40_000, 2048)]
K = 32


def timed(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (allocations, CUDA kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def knn_before(queries: torch.Tensor, points: torch.Tensor, k: int) -> torch.Tensor:
    """The previous kNN: checks for NaN (a sync) and recomputes the points' side per chunk."""
    if not bool(torch.isfinite(queries).all()) or not bool(torch.isfinite(points).all()):
        raise ValueError("non-finite")
    batch, m, _ = queries.shape
    n = points.shape[1]
    chunk = max(1, min(m, (1 << 25) // max(1, batch * n)))
    out = torch.empty(batch, m, k, dtype=torch.long, device=queries.device)
    for start in range(0, m, chunk):
        dist = square_distance(queries[:, start : start + chunk], points)
        out[:, start : start + chunk] = dist.topk(k, dim=-1, largest=False, sorted=True).indices
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="all", choices=["cpu", "cuda", "all"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    with_cluster = cluster_available()

    title = (
        f"cd2p.ops: best of {args.repeats}, ms per call "
        f"(torch {torch.__version__}, {torch.get_num_threads()} CPU threads)"
    )
    table = Table(title=title)
    for col in ("device", "op", "B x N -> M", "before ms", "now ms"):
        table.add_column(col, justify="right" if col.endswith("ms") else "left")
    if with_cluster:
        table.add_column("cluster ms", justify="right")
    table.add_column("before / now", justify="right")
    for device in devices:
        for b, n, m in SIZES:
            points = torch.rand(b, n, 3, device=device)
            centers = points[:, :m].contiguous()
            calls = {
                "fps": (
                    lambda p=points, m=m: farthest_point_sample(p, m, backend="torch"),
                    lambda p=points, m=m: farthest_point_sample(p, m, validate=False),
                    lambda p=points, m=m: farthest_point_sample(p, m, backend="cluster"),
                ),
                f"knn K={K}": (
                    lambda c=centers, p=points: knn_before(c, p, K),
                    lambda c=centers, p=points: knn(c, p, K, validate=False, backend="torch"),
                    lambda c=centers, p=points: knn(c, p, K, backend="cluster"),
                ),
            }
            for op, (before, now, cluster) in calls.items():
                t_before = timed(before, device, args.repeats)
                t_now = timed(now, device, args.repeats)
                row = [device, op, f"{b} x {n} -> {m}", f"{t_before:.1f}", f"{t_now:.1f}"]
                if with_cluster:
                    row.append(f"{timed(cluster, device, args.repeats):.1f}")
                row.append(f"{t_before / t_now:.2f}x")
                table.add_row(*row)
    Console().print(table)
    if not cluster_available():
        print("torch-cluster not installed: pip install --no-build-isolation 'cd2p[cluster]'")


if __name__ == "__main__":
    main()
