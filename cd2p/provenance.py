"""Provenance: what a result was computed from and on, written into every ``metrics.json``,
``summary.json`` and model card.

- :func:`data_fingerprint`: a SHA-256 over the prepared data's files (tensor files byte for
  byte; JSON metadata canonically, without timings), so that two runs can be checked to have
  read the same data wherever it lies on disk;
- :func:`environment`: cd2p version and git commit, Python, torch, CUDA, cuDNN, the hardware;
- :func:`training_statistics`: training time, samples/s and peak memory from a run's
  ``metrics.jsonl`` (exact across resumes, which drop the records after their checkpoint);
- :func:`provenance`: all of it with the recipe, seeds, wall time and GPU-hours;
- :class:`PublicPaths`: the same records made fit to publish (``cd2p push``): local absolute
  paths replaced by ``<data>/...``, ``<run>/...``, ``~/...`` or ``<local>/<name>``, the
  fingerprints kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import re
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

# JSON keys that record how long something took, not what the data is.
_VOLATILE_KEYS = ("seconds", "elapsed", "started", "finished", "duration")
_VOLATILE_SUFFIXES = ("_seconds", "_per_s")


def _is_volatile(key: str) -> bool:
    return key in _VOLATILE_KEYS or key.endswith(_VOLATILE_SUFFIXES)


def _skipped(path: Path) -> bool:
    """Files that describe a preparation run rather than the data: reports, temporaries,
    pictures and logs."""
    name = path.name
    return (
        name.startswith((".", "prepare_report"))
        or ".tmp" in name
        or any(part.startswith(".tmp") for part in path.parts)
        or path.suffix in (".png", ".log", ".lock")
    )


def _canonical_json(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _canonical_json(v) for k, v in sorted(value.items()) if not _is_volatile(k)}
    if isinstance(value, list):
        return [_canonical_json(v) for v in value]
    return value


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            data = None
        if data is not None:
            digest.update(json.dumps(_canonical_json(data), sort_keys=True).encode())
            return digest.hexdigest()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_fingerprint(paths: str | Path | Sequence[str | Path]) -> dict[str, Any]:
    """``{"sha256", "files", "bytes"}`` of one or several prepared data directories.

    The hash covers every data file (relative path and content) in sorted order; JSON files
    enter canonically without their timing keys, and preparation reports, temporaries, PNGs
    and logs are left out. The same data prepared twice, or copied elsewhere, has the same
    fingerprint; a different split, point count or label changes it.
    """
    roots = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
    digest = hashlib.sha256()
    files = size = 0
    for index, root in enumerate(roots):
        if not root.exists():
            raise FileNotFoundError(f"cannot fingerprint {root}: no such file or directory")
        members = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for path in members:
            rel = path.relative_to(root) if root.is_dir() else Path(path.name)
            if _skipped(rel):
                continue
            digest.update(f"{index}:{rel.as_posix()}:{_file_digest(path)}\n".encode())
            files += 1
            size += path.stat().st_size
    return {"sha256": digest.hexdigest(), "files": files, "bytes": size}


@lru_cache(maxsize=1)
def _git_commit() -> tuple[str | None, bool | None]:
    """The commit of the cd2p source tree and whether it has uncommitted changes, when cd2p
    runs from a git checkout (``None`` otherwise)."""
    root = Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None, None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], check=True,
                                capture_output=True, text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "cd2p"],
                                check=True, capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit or None, bool(status.strip())


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: Any = None, world_size: int = 1) -> dict[str, Any]:
    """cd2p version and commit, Python, torch, CUDA and cuDNN versions, and the hardware the
    run used (``device``: the torch device of rank 0; ``world_size`` processes)."""
    import torch

    from cd2p import __version__

    commit, dirty = _git_commit()
    kind = getattr(device, "type", str(device or "cpu"))
    hardware: dict[str, Any] = {
        "device": kind,
        "processes": world_size,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
    }
    if kind == "cuda" and torch.cuda.is_available():
        index = getattr(device, "index", None) or 0
        hardware["gpu"] = torch.cuda.get_device_name(index)
        hardware["gpus"] = world_size
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {
        "cd2p_version": __version__,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "cuda": torch.version.cuda,
        "cudnn": cudnn,
        "platform": platform.platform(terse=True),
        "hardware": hardware,
    }


def training_statistics(run_dir: str | Path, global_batch: int) -> dict[str, Any]:
    """From ``RUN/metrics.jsonl``: optimiser steps, training samples, the time spent in
    training steps (the log windows, without evaluation and checkpoints), samples/s and the
    peak memory of rank 0 (GPU memory allocated on CUDA, resident set on CPU)."""
    path = Path(run_dir) / "metrics.jsonl"
    steps = 0
    seconds = 0.0
    peak = 0.0
    previous = 0
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if not isinstance(record, dict) or record.get("kind") != "train":
                continue
            step = int(record.get("step", previous))
            rate = record.get("samples_per_s")
            if isinstance(rate, int | float) and rate > 0 and step > previous:
                seconds += (step - previous) * global_batch / rate
            previous, steps = step, max(steps, step)
            peak = max(peak, float(record.get("peak_memory_mb") or 0.0))
    samples = steps * global_batch
    return {
        "steps": steps,
        "train_samples": samples,
        "train_time_s": round(seconds, 3),
        "samples_per_s": round(samples / seconds, 3) if seconds > 0 else None,
        "peak_memory_mb": round(peak, 1) if peak else None,
    }


def recipe_sha256(recipe_text: str) -> str:
    """The SHA-256 of a recipe's YAML text (as saved in ``recipe.yaml``)."""
    return hashlib.sha256(recipe_text.encode()).hexdigest()


def provenance(
    *,
    data: Mapping[str, Any] | None,
    recipe: Any = None,
    recipe_name: str | None = None,
    seeds: Iterable[int] | None = None,
    wall_time_s: float | None = None,
    device: Any = None,
    world_size: int = 1,
    run_dir: str | Path | None = None,
    global_batch: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Everything a result's reader needs to judge and repeat it: the data fingerprint, the
    recipe (name and hash), the seeds, the software and hardware, the wall time and GPU-hours,
    and, for a training run, samples/s and peak memory."""
    from cd2p.config import dump_recipe

    out: dict[str, Any] = {"data": dict(data) if data is not None else None}
    if recipe is not None:
        out["recipe"] = {"name": recipe_name, "sha256": recipe_sha256(dump_recipe(recipe))}
    if seeds is not None:
        out["seeds"] = [int(s) for s in seeds]
    out.update(environment(device, world_size))
    if wall_time_s is not None:
        out["wall_time_s"] = round(float(wall_time_s), 3)
        gpus = world_size if getattr(device, "type", str(device)) == "cuda" else 0
        out["gpu_hours"] = round(float(wall_time_s) * gpus / 3600.0, 4)
    if run_dir is not None and global_batch is not None:
        out.update(training_statistics(run_dir, global_batch))
    out.update(extra or {})
    return out


def check_same_data(saved: dict[str, Any] | None, now: dict[str, Any], where: str | Path) -> None:
    """A resumed run must read the data it started with."""
    if saved and saved.get("sha256") and saved["sha256"] != now["sha256"]:
        raise ValueError(
            f"the prepared data {now['path']} changed since {where} started (fingerprint "
            f"{saved['sha256'][:12]}... then, {now['sha256'][:12]}... now); a run must read "
            "one dataset: start a new run"
        )


def combine(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The provenance of several runs on the same data (a multi-seed run, the few-shot folds):
    the shared facts once, wall time and GPU-hours summed, the peak memory maximised and the
    throughput averaged over the training time."""
    if not parts:
        return {}
    first = dict(parts[0])
    out = {k: v for k, v in first.items() if k not in ("seeds", "recipe")}
    seeds = [s for p in parts for s in p.get("seeds", [])]
    if seeds:
        out["seeds"] = seeds
    for key in ("wall_time_s", "gpu_hours", "train_time_s", "train_samples", "steps"):
        values = [p[key] for p in parts if isinstance(p.get(key), int | float)]
        if values:
            out[key] = round(sum(values), 4)
    peaks = [p["peak_memory_mb"] for p in parts if isinstance(p.get("peak_memory_mb"), int | float)]
    out["peak_memory_mb"] = max(peaks) if peaks else None
    if out.get("train_time_s"):
        out["samples_per_s"] = round(out.get("train_samples", 0) / out["train_time_s"], 3)
    out["runs"] = len(parts)
    return out


# -- what is published: no local paths -------------------------------------------------------

# Characters that end a path inside a sentence, a JSON or YAML value or a command line.
_PATH_CHARS = r"""[^\s'"(),;\[\]|`<>]"""
_PATH_END = r"""(?=$|[/\\\s'"(),;\[\]|`<>:])"""
# A path starts a value or follows a space, quote, bracket, "=" or ",": so "km/h", "org/name"
# and the "//" of "https://" are never taken for one.
_PATH_START = r"""(?:^|(?<=[\s'"(\[=,]))"""
_ABSOLUTE = re.compile(
    _PATH_START + r"""(?:/|[A-Za-z]:[\\/])[^/\\\s'"(),;\[\]|`<>]""" + _PATH_CHARS + "*"
)


class PublicPaths:
    """Replaces local absolute paths in what is published with a model (``cd2p push``).

    A data root becomes ``<data>/<its name>`` and a file in it ``<data>/<name>/<path in it>``;
    the run directory ``<run>``; anything under the home directory ``~/...``; any other
    absolute path ``<local>/<its last part>``. The data stays identifiable by its fingerprint
    (``provenance.data.sha256``), which is kept.

    Args:
        data: the data roots the run read.
        run: the run (or model) directory being published.
    """

    def __init__(self, data: Iterable[str | Path] = (), run: str | Path | None = None) -> None:
        places: list[tuple[str, str]] = []
        for root in data:
            places += [(form, f"<data>/{Path(root).name}") for form in _forms(root)]
        if run is not None:
            places += [(form, "<run>") for form in _forms(run)]
        home = str(Path.home()).rstrip("/")
        if home.count("/") >= 1 and len(home) > 1:
            places.append((home, "~"))
        # Longest first: a data root inside the home directory is named as data.
        places.sort(key=lambda item: -len(item[0]))
        self.places = places
        self._known = [(re.compile(_PATH_START + re.escape(p) + _PATH_END), sub)
                       for p, sub in places]  # fmt: skip

    @property
    def local(self) -> list[str]:
        """The local directories that must not appear in anything published."""
        return sorted({p for p, _ in self.places})

    def text(self, value: str) -> str:
        """``value`` with every absolute path replaced (see the class docstring)."""
        for pattern, sub in self._known:
            value = pattern.sub(lambda _m, s=sub: s, value)

        def other(match: re.Match) -> str:
            name = re.split(r"[\\/]", match.group(0).rstrip("/\\"))[-1]
            return f"<local>/{name}" if name else "<local>"

        return _ABSOLUTE.sub(other, value)

    def value(self, value: Any) -> Any:
        """A JSON / YAML value with :meth:`text` applied to every string in it (keys too)."""
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, Mapping):
            return {self.value(k): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value

    def leaks(self, data: bytes) -> list[str]:
        """The local directories whose path occurs in ``data`` (as text or JSON-escaped)."""
        found = []
        for place in self.local:
            forms = {place.encode(), json.dumps(place)[1:-1].encode(),
                     json.dumps(place, ensure_ascii=False)[1:-1].encode()}  # fmt: skip
            if any(form in data for form in forms):
                found.append(place)
        return found


def _forms(path: str | Path) -> list[str]:
    """The spellings of a directory in records: as given and resolved (symbolic links)."""
    text = str(path).rstrip("/\\") or str(path)
    forms = {text}
    if Path(text).is_absolute():
        forms.add(str(Path(text).resolve()))
    return [f for f in forms if Path(f).is_absolute() and len(f) > 1]


__all__ = [
    "PublicPaths",
    "check_same_data",
    "combine",
    "data_fingerprint",
    "environment",
    "provenance",
    "recipe_sha256",
    "training_statistics",
]
