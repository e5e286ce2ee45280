"""Time the data fingerprint every run records (``cd2p.provenance.data_fingerprint``).

    python benchmarks/fingerprint.py [--mb 512] [--files 64] [--repeats 3]

Writes a prepared-data-like directory (``--files`` tensor files of random bytes, a
``meta.json`` with 100 000 shape ids and a ``prepare_report.json``), then times, in one run,
best of ``--repeats`` interleaved: the fingerprint, and a plain SHA-256 of the same bytes read
in 4 MB chunks (the floor any content hash pays). Columns: seconds, MB/s and the ratio.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from cd2p.provenance import data_fingerprint


def write_data(root: Path, megabytes: int, files: int) -> int:
    size = megabytes * 2**20 // files
    for i in range(files):
        (root / f"scene{i:04d}.safetensors").write_bytes(os.urandom(size))
    meta = {"format": "bench", "splits": {"train": [f"shape_{i:06d}" for i in range(100_000)]}}
    (root / "meta.json").write_text(json.dumps(meta))
    (root / "prepare_report.json").write_text(json.dumps({"seconds": 1.0}))
    return size * files


def plain_sha256(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.iterdir()):
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                digest.update(chunk)
    return digest.hexdigest()


def best_of_interleaved(fns: dict, repeats: int) -> dict[str, float]:
    """Best wall time of each function, the repeats interleaved so that both see the same
    load of a shared machine."""
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=512)
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        total = write_data(root, args.mb, args.files) / 2**20
        best = best_of_interleaved({"data_fingerprint": lambda: data_fingerprint(root),
                                    "plain sha256 of the bytes": lambda: plain_sha256(root)},
                                   args.repeats)  # fmt: skip
        rows = list(best.items())
    table = Table(title=f"fingerprint of {total:.0f} MB in {args.files} files, best of "
                  f"{args.repeats}")  # fmt: skip
    for column in ("method", "seconds", "MB/s", "time / plain sha256"):
        table.add_column(column, justify="left" if column == "method" else "right")
    for name, seconds in rows:
        table.add_row(name, f"{seconds:.2f}", f"{total / seconds:.0f}",
                      f"{seconds / rows[1][1]:.2f}x")  # fmt: skip
    Console().print(table)


if __name__ == "__main__":
    main()
