"""The scene job runner shared by the ScanNet preparers (``cd2p prepare scannet``,
``cd2p prepare scannet-scenes``).

A preparer turns each scene of a ScanNet root into ``OUT/scenes/<scene_id>/`` with a function
of one scene id (picklable: a module-level function, or a :func:`functools.partial` of one)
that returns the scene's statistics as a dict with at least ``scene_id``, ``status``
(``done`` or ``error``), ``warnings``, ``error`` and ``file``. This module does the rest:

* which scenes: :func:`list_scenes` (split lists, ``all``, an explicit list),
  :func:`shard_scenes` (part ``I`` of ``N``) and :func:`select_scenes` (both, refusing a
  selection with nothing to prepare: an empty root, list or shard is an error naming it);
* ``OUT/prepare_config.json``: written by the first run; a resumed run must use the same
  settings (:func:`check_config`);
* resume: a scene whose ``OUT/scenes/<scene_id>/`` exists is finished (a scene is written
  into ``OUT/scenes/.tmp-<scene_id>.<pid>-<random>/`` and renamed when complete, see
  :func:`fresh_tmp_dir` and :func:`commit_scene_dir`), and its stored statistics are reported
  as ``resumed``;
* running the scene function over the other scenes in this process or in a spawn process
  pool (:func:`run_scene_jobs`), with a rich progress bar (scenes done plus a task-specific
  counter such as pairs or vertices). Workers die with the process that started them
  (:func:`_worker_init`): after a ``kill -9`` of the command no worker goes on writing, and
  since temporary names carry the writer's pid, a rerun never shares one with a leftover;
* the report, written atomically when the run ends, also when it is interrupted
  (``KeyboardInterrupt`` or an exception): ``interrupted`` is then true and the scenes not
  reached are counted.
"""

from __future__ import annotations

import ctypes
import glob
import json
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

from cd2p._atomic import atomic_write_json
from cd2p.data.common import EmptySplitError

SCENE_STATS_FILE = "cd2p_scene.json"
CONFIG_FILE = "prepare_config.json"
TMP_PREFIX = ".tmp-"
SPLIT_FILES = {"train": "scannetv2_train.txt", "val": "scannetv2_val.txt"}

SceneTask = Callable[[str], dict[str, Any]]
"""Prepare one scene: ``task(scene_id) -> statistics`` (must be picklable for workers > 1)."""


# --------------------------------------------------------------------------- which scenes


def find_split_file(root: Path, split: str) -> Path:
    """Locate ``scannetv2_<split>.txt`` at ROOT, ROOT/meta, ROOT/.. or ROOT/Tasks/Benchmark."""
    name = SPLIT_FILES[split]
    candidates = [root / name, root / "meta" / name, root.parent / name,
                  root / "Tasks" / "Benchmark" / name]
    for path in candidates:
        if path.is_file():
            return path
    where = ", ".join(str(p.parent) for p in candidates)
    raise FileNotFoundError(
        f"split list {name} not found (looked in {where}); pass --split all or --scenes FILE"
    )


def read_scene_list(path: Path) -> list[str]:
    """Scene ids from a text file, one per line (blank lines and ``#`` comments ignored)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"scene list {path} not found")
    names = []
    for line in path.read_text(encoding="utf-8").splitlines():
        name = line.split("#", 1)[0].strip()
        if name:
            if "/" in name or "\\" in name or name.startswith("."):
                raise ValueError(f"{path}: {name!r} is not a scene id")
            names.append(name)
    return names


def list_scenes(root: str | Path, split: str, scenes_file: str | Path | None, *,
                scene_file: str) -> list[str]:
    """Sorted, de-duplicated scene ids of a ScanNet root for a split or an explicit list.

    An empty result is an :class:`~cd2p.data.common.EmptySplitError` naming the root or the
    list, and so is a list none of whose scenes has its ``scene_file`` under ``root``.

    Args:
        root: ScanNet root holding ``scans/<scene>/``.
        split: ``train``/``val`` (ScanNet's split lists, see :func:`find_split_file`) or
            ``all`` (every ``scans/<scene>/`` holding ``scene_file``).
        scenes_file: text file of scene ids; overrides ``split``.
        scene_file: the file that makes a directory a scene, ``{scene}`` standing for its
            name, e.g. ``"{scene}.sens"``.
    """
    root = Path(root)
    scans = root / "scans"
    if not scans.is_dir():
        example = scene_file.format(scene="<scene>")
        raise FileNotFoundError(
            f"{scans} not found: expected a ScanNet v2 root with scans/<scene>/{example}"
        )
    if scenes_file is not None:
        names = read_scene_list(Path(scenes_file))
    elif split == "all":
        names = [d.name for d in scans.iterdir()
                 if (d / scene_file.format(scene=d.name)).is_file()]
    elif split in SPLIT_FILES:
        names = read_scene_list(find_split_file(root, split))
    else:
        raise ValueError(f"split must be train, val or all, got {split!r}")
    example = "scans/<scene>/" + scene_file.format(scene="<scene>")
    if not names:
        if scenes_file is not None:
            raise EmptySplitError(f"scene list {scenes_file} names no scene")
        if split == "all":
            raise EmptySplitError(f"{root}: no scene to prepare (no {example}; --split all)")
        raise EmptySplitError(f"split list {find_split_file(root, split)} names no scene")
    # A root without any of the listed scenes' files is a wrong ROOT (or a download that did
    # not happen): one clear error, not one failed scene per listed name.
    if not any((scans / name / scene_file.format(scene=name)).is_file() for name in names):
        source = f"--scenes {scenes_file}" if scenes_file is not None else f"--split {split}"
        raise EmptySplitError(f"{root}: none of the {len(set(names))} scene(s) of {source} "
                              f"has a {example}")
    return sorted(set(names))


def shard_scenes(scenes: Sequence[str], shard: tuple[int, int]) -> list[str]:
    """Part ``I`` of ``N`` of the sorted scene list (round robin, so parts are balanced); the
    parts are disjoint and together are the whole list."""
    index, count = shard
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard must satisfy 0 <= I < N, got {index}/{count}")
    return sorted(scenes)[index::count]


def select_scenes(root: str | Path, split: str, scenes_file: str | Path | None,
                  shard: tuple[int, int], *, scene_file: str) -> list[str]:
    """:func:`list_scenes`, then part ``shard`` of them (:func:`shard_scenes`); an empty
    selection (see :func:`list_scenes`, or a shard beyond the number of scenes) is an
    :class:`~cd2p.data.common.EmptySplitError`, never an empty successful run."""
    scenes = list_scenes(root, split, scenes_file, scene_file=scene_file)
    part = shard_scenes(scenes, shard)
    if not part:
        raise EmptySplitError(f"{root}: shard {shard[0]}/{shard[1]} of the {len(scenes)} "
                              f"scene(s) is empty; use at most {len(scenes)} shard(s)")
    return part


def check_workers(workers: int) -> None:
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")


# --------------------------------------------------------------------------- OUT directory


def report_name(shard: tuple[int, int]) -> str:
    """``prepare_report.json``, or ``prepare_report.shard-I-of-N.json`` for a shard."""
    index, count = shard
    return "prepare_report.json" if count == 1 else f"prepare_report.shard-{index}-of-{count}.json"


def check_config(out: Path, wanted: Mapping[str, Any]) -> None:
    """Write ``OUT/prepare_config.json``, or check that an existing one holds ``wanted``.

    A resumed run must produce the same scenes as the first one: same settings. ``wanted``
    must be JSON data that compares equal after a round trip (lists, not tuples).
    """
    path = Path(out) / CONFIG_FILE
    wanted = dict(wanted)
    if path.is_file():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if found != wanted:
            diff = ", ".join(f"{k}: {found.get(k)} -> {v}" for k, v in wanted.items()
                             if found.get(k) != v)
            raise ValueError(
                f"{out} was prepared with other settings ({diff}); use a new OUT directory "
                "or the original settings to resume"
            )
    else:
        atomic_write_json(path, wanted)


def load_scene_stats(scene_dir: Path) -> dict[str, Any]:
    """The statistics a finished scene directory was written with."""
    return json.loads((Path(scene_dir) / SCENE_STATS_FILE).read_text(encoding="utf-8"))


def finished_scenes(scenes_dir: Path, scenes: Sequence[str]
                    ) -> tuple[list[dict[str, Any]], list[str]]:
    """Split ``scenes`` into the finished ones (their stored statistics, with status
    ``resumed``) and the ones still to prepare (in the given order)."""
    done, remaining = [], []
    for scene_id in scenes:
        if (scenes_dir / scene_id).is_dir():
            stats = load_scene_stats(scenes_dir / scene_id)
            stats["status"] = "resumed"
            done.append(stats)
        else:
            remaining.append(scene_id)
    return done, remaining


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine and is not a zombie."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    try:  # Linux: a killed process nobody reaped yet still answers kill(0)
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _tmp_owner(name: str, scene_id: str) -> int | None | bool:
    """The pid in a temporary name of ``scene_id`` (``.tmp-<scene>.<pid>-<random>``), ``None``
    for the name older cd2p versions used (``.tmp-<scene>``), ``False`` if the name is not a
    temporary of this scene (another scene whose id starts with this one's)."""
    base = f"{TMP_PREFIX}{scene_id}"
    if name == base:
        return None
    pid = name[len(base) + 1:].split("-", 1)[0] if name.startswith(base + ".") else ""
    return int(pid) if pid.isdigit() else False


def fresh_tmp_dir(scenes_dir: Path, scene_id: str) -> Path:
    """A temporary directory name for ``scene_id`` that only this process uses,
    ``scenes_dir/.tmp-<scene_id>.<pid>-<random>`` (not created: the caller makes it, or lets
    its writer make it).

    Temporaries of this scene that an interrupted run left (the unsuffixed name of older
    versions, or one whose process is gone) are removed first. One whose process still runs is
    left alone: an orphaned worker finishing the scene writes only into its own directory, so
    the two never mix (see :func:`commit_scene_dir` for who wins).
    """
    scenes_dir = Path(scenes_dir)
    for stale in scenes_dir.glob(glob.escape(f"{TMP_PREFIX}{scene_id}") + "*"):
        owner = _tmp_owner(stale.name, scene_id)
        # This process's own is stale too: it prepares one scene at a time, so that one is
        # from an earlier call that stopped half-way.
        if owner is None or (owner is not False and (owner == os.getpid()
                                                      or not _process_alive(owner))):
            shutil.rmtree(stale, ignore_errors=True)
    return scenes_dir / f"{TMP_PREFIX}{scene_id}.{os.getpid()}-{secrets.token_hex(4)}"


def commit_scene_dir(tmp: Path, final: Path, record: Mapping[str, Any]) -> None:
    """Write the scene's statistics into ``tmp`` (last), then rename ``tmp`` to ``final``: a
    scene directory under its final name is always complete.

    If another process committed the scene first (a worker of an earlier, killed run that was
    still finishing it), its directory is kept and ``tmp`` dropped: both were made from the
    same files with the same settings (``prepare_config.json`` is checked on every run).
    """
    tmp, final = Path(tmp), Path(final)
    (tmp / SCENE_STATS_FILE).write_text(json.dumps(record, indent=2), encoding="utf-8")
    try:
        os.replace(tmp, final)
    except OSError:
        if not (final / SCENE_STATS_FILE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- report parts


def scene_counts(stats: Sequence[Mapping[str, Any]], total: int) -> dict[str, int]:
    """The report's ``scenes`` block: total, prepared, resumed, failed, not_reached."""
    return {
        "total": total,
        "prepared": sum(s["status"] == "done" for s in stats),
        "resumed": sum(s["status"] == "resumed" for s in stats),
        "failed": sum(s["status"] == "error" for s in stats),
        "not_reached": total - len(stats),
    }


def scene_errors(stats: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The report's ``errors``: ``{"scene", "file", "error"}`` per failed scene."""
    return [{"scene": s["scene_id"], "file": s["file"], "error": s["error"]}
            for s in stats if s["status"] == "error"]


def scene_warnings(stats: Sequence[Mapping[str, Any]]) -> list[str]:
    """The report's ``warnings``: ``"<scene>: <warning>"`` over the finished scenes."""
    return [f"{s['scene_id']}: {w}" for s in stats if s["status"] in ("done", "resumed")
            for w in s["warnings"]]


# --------------------------------------------------------------------------- the run


def run_scene_jobs(
    task: SceneTask,
    scenes: Sequence[str],
    out: str | Path,
    *,
    config: Mapping[str, Any],
    summarise: Callable[[list[dict[str, Any]], float, bool], dict[str, Any]],
    report_file: str,
    workers: int = 1,
    progress: bool = True,
    counter: str = "pairs",
    on_scene_done: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Prepare ``scenes`` into ``out/scenes/`` with ``task``, resuming finished ones.

    Args:
        task: ``task(scene_id) -> statistics``; writes ``out/scenes/<scene_id>`` atomically
            and reports bad scene files as ``status="error"`` instead of raising.
        scenes: the scene ids of this run (already sharded).
        out: the output directory (created).
        config: the settings that change the output (see :func:`check_config`).
        summarise: ``summarise(stats, seconds, interrupted) -> report``; ``stats`` holds the
            statistics of the resumed and the finished scenes.
        report_file: the report's name in ``out`` (see :func:`report_name`).
        workers: processes over scenes (1 = in this process; more = a spawn pool).
        progress: show a rich progress bar.
        counter: the statistics key the progress bar sums (``pairs``, ``vertices``...).
        on_scene_done: called in this process with each scene's statistics as it finishes.

    Returns:
        The report, also written atomically to ``out/report_file``, also when the run stops
        early (an exception in ``task`` or ``on_scene_done``, ``KeyboardInterrupt``), with
        ``interrupted`` set by ``summarise``.
    """
    check_workers(workers)
    out = Path(out)
    scenes_dir = out / "scenes"
    scenes_dir.mkdir(parents=True, exist_ok=True)
    check_config(out, config)
    stats, remaining = finished_scenes(scenes_dir, scenes)

    start = time.perf_counter()
    interrupted = True
    bar = SceneProgress(len(scenes), len(stats), enabled=progress, counter=counter)
    try:
        with bar:
            for result in _run_tasks(task, remaining, workers):
                stats.append(result)
                bar.advance(result)
                if on_scene_done is not None:
                    on_scene_done(result)
        interrupted = False
    finally:
        report = summarise(stats, time.perf_counter() - start, interrupted)
        atomic_write_json(out / report_file, report)
    return report


def _run_tasks(task: SceneTask, scenes: list[str], workers: int) -> Iterator[dict[str, Any]]:
    """Yield each scene's statistics as it finishes (in this process or in a spawn pool)."""
    if workers == 1 or len(scenes) <= 1:
        for scene_id in scenes:
            yield task(scene_id)
        return
    # spawn: safe with threads (torch, datasets) in the parent and the same on every OS.
    context = multiprocessing.get_context("spawn")
    pool = ProcessPoolExecutor(max_workers=min(workers, len(scenes)), mp_context=context,
                               initializer=_worker_init, initargs=(os.getpid(),))
    try:
        pending: set[Future] = set()
        queue = list(reversed(scenes))
        # Keep at most 2 tasks per worker queued so an interrupt loses little work.
        while queue or pending:
            while queue and len(pending) < 2 * workers:
                pending.add(pool.submit(task, queue.pop()))
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# --------------------------------------------------------------------------- worker lifetime

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_PARENT_POLL_SECONDS = 0.5


def _worker_init(parent_pid: int) -> None:
    """Run first in every worker process: tie the worker's life to its parent's.

    A worker blocked on the task queue, or busy with a scene, does not notice on its own that
    the parent was killed (``kill -9``, the OOM killer): it would finish the scene and write
    it, or wait forever. On Linux the kernel sends it SIGKILL when the parent dies
    (``prctl(PR_SET_PDEATHSIG)``); elsewhere a daemon thread polls ``os.getppid()`` and exits
    the process when the parent has changed. A parent that died before this ran is caught by
    the ``getppid`` check at the end.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that created the worker ends: the pool is
    created and fed from one thread in :func:`_run_tasks` (``ProcessPoolExecutor`` spawns its
    workers from ``submit``, in the calling thread) and shut down before that call returns.
    """
    if not _die_with_parent():
        threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True,
                         name="cd2p-parent-watch").start()
    if os.getppid() != parent_pid:
        os._exit(1)


def _die_with_parent() -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is not
    available (another OS, no libc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch_parent(parent_pid: int) -> None:
    """The fallback of :func:`_worker_init`: exit at once (no cleanup, like SIGKILL) when the
    parent is gone, which shows as a new parent pid (the process was re-parented)."""
    while True:
        time.sleep(_PARENT_POLL_SECONDS)
        if os.getppid() != parent_pid:
            os._exit(1)


class SceneProgress:
    """Rich progress over scenes, with a counter summed from the scenes' statistics (pairs
    written, vertices...) and its rate."""

    def __init__(self, total: int, already: int, enabled: bool, counter: str = "pairs") -> None:
        self.enabled = enabled
        self.counter = counter
        self.count = 0
        self.start = time.perf_counter()
        if not enabled:
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(
            TextColumn("[bold]scenes"), BarColumn(), MofNCompleteColumn(),
            TextColumn(f"{{task.fields[count]}} {counter}, {{task.fields[rate]}} {counter}/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            transient=False,
        )
        self.task = self.progress.add_task("prepare", total=total, completed=already,
                                           count=0, rate="-")

    def __enter__(self) -> SceneProgress:
        if self.enabled:
            self.progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.enabled:
            self.progress.__exit__(*exc)

    def advance(self, scene: Mapping[str, Any]) -> None:
        self.count += scene.get(self.counter, 0)
        if self.enabled:
            rate = self.count / max(time.perf_counter() - self.start, 1e-9)
            self.progress.update(self.task, advance=1, count=self.count,
                                 rate=f"{rate:.1f}" if rate < 1000 else f"{rate:.0f}")
