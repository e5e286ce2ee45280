"""Time farthest point sampling and kNN at the sizes cd2p uses.

    python benchmarks/ops.py [--repeats 3] [--device cpu|cuda|all] [--threads T]

Rows: B x N -> M (kNN takes K = 32 neighbours of the M centers among the N points).
Columns: milliseconds per call for the pure-torch backend and torch-cluster (when installed),
and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch
from rich.console import Console
from rich.table import Table

from cd2p.ops import cluster_available, farthest_point_sample, knn

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
    backends = ["torch"] + (["cluster"] if cluster_available() else [])

    title = (
        f"cd2p.ops: best of {args.repeats}, ms per call "
        f"(torch {torch.__version__}, {torch.get_num_threads()} CPU threads)"
    )
    table = Table(title=title)
    for col in ("device", "op", "B x N -> M"):
        table.add_column(col)
    for backend in backends:
        table.add_column(f"{backend} ms", justify="right")
    if len(backends) == 2:
        table.add_column("cluster speed-up", justify="right")
    for device in devices:
        for b, n, m in SIZES:
            points = torch.rand(b, n, 3, device=device)
            centers = points[:, :m].contiguous()
            calls = {
                "fps": lambda be, p=points, m=m: farthest_point_sample(p, m, backend=be),
                f"knn K={K}": lambda be, c=centers, p=points: knn(c, p, K, backend=be),
            }
            for op, call in calls.items():
                times = [
                    timed(lambda be=be, call=call: call(be), device, args.repeats)
                    for be in backends
                ]
                row = [device, op, f"{b} x {n} -> {m}"] + [f"{t:.1f}" for t in times]
                if len(times) == 2:
                    row.append(f"{times[0] / times[1]:.2f}x")
                table.add_row(*row)
    Console().print(table)
    if not cluster_available():
        print("torch-cluster not installed: pip install --no-build-isolation 'cd2p[cluster]'")


if __name__ == "__main__":
    main()
