"""Atomic writes: build an output under a temporary name, then rename it into place.

Every file and directory cd2p produces goes through these helpers, so an interrupted run never
leaves half an output under its final name: a reader sees the old version or the new one.

- :func:`atomic_write_text`, :func:`atomic_write_bytes`, :func:`atomic_write_json`: whole
  contents already in memory.
- :func:`atomic_output`: a writer that needs a file *name* (safetensors ``save_file``,
  matplotlib ``savefig``, ``h5py``...).
- :func:`atomic_directory`: a whole directory (a Hub model, a checkpoint, a data set).
- :func:`remove_stale_temporaries`: what a killed writer left behind, cleared on the next start.

Temporaries are hidden siblings of the target, ``.<name>.<pid>-<random>.tmp[suffix]``: the same
directory means the same file system, where ``os.replace`` is an atomic rename. Unlike
``tempfile.mkstemp`` / ``mkdtemp`` (modes 0600 / 0700, which the rename would carry over to the
final output), they are created with the default modes 0666 / 0777 minus the umask, and
everything in them is given those modes again before the rename (writers such as safetensors'
``save_file`` create 0600 files), so the result has the permissions a plain ``open()`` /
``mkdir()`` would give. There is no ``fsync``: the guarantee is against a killed process, not a
power cut.

A process killed mid-write leaves its temporary behind (and :func:`atomic_directory` a
``….tmp.old`` trash directory). The pid in the name says whose it is, so
:func:`remove_stale_temporaries` can delete those of dead processes without touching what a
live one is still writing.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# ``.<name>.<pid>-<8 hex>.tmp<suffix>``, as :func:`_fresh_sibling` names them.
_TEMPORARY = re.compile(r"\.(?P<target>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp(?P<suffix>.*)")
# Names of the temporaries this process is writing right now: they carry our pid but are not
# stale (a cleanup from another thread must leave them alone).
_IN_FLIGHT: set[str] = set()


def _create_file(path: Path) -> None:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))


def _create_dir(path: Path) -> None:
    os.mkdir(path, 0o777)


def _umask() -> int:
    """This process's umask, read without changing it where Linux shows it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def _usual_modes(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything in it) the modes a plain ``open()`` /
    ``mkdir()`` would: some writers create private files (safetensors' ``save_file`` makes
    0600 files), which the rename would otherwise publish as they are."""
    mask = _umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    if path.is_dir():
        for parent, dirs, names in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(parent, name), dir_mode)
            for name in names:
                full = os.path.join(parent, name)
                if not os.path.islink(full):
                    os.chmod(full, file_mode)
        os.chmod(path, dir_mode)
    elif path.is_file():
        os.chmod(path, file_mode)


def _fresh_sibling(path: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """Create and return a new hidden sibling of ``path`` (exclusive: never an existing one)."""
    for _ in range(100):
        tmp = path.parent / f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp{suffix}"
        try:
            create(tmp)
        except FileExistsError:
            continue
        _IN_FLIGHT.add(tmp.name)
        return tmp
    raise FileExistsError(f"could not create a temporary name next to {path}")


@contextmanager
def atomic_output(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary file path next to ``path``; it is renamed onto ``path`` when the block
    completes and removed if it raises (an existing ``path`` is then left untouched).

    ``suffix`` ends the temporary name, for writers that infer the format from it
    (``atomic_output("plot.png", suffix=".png")`` for ``savefig``). The file already exists
    (empty) when yielded; writers that open it with ``"w"`` simply overwrite it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(path, suffix, _create_file)
    try:
        yield tmp
        _usual_modes(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # still there only when the block failed
        _IN_FLIGHT.discard(tmp.name)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (parent directories are created)."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically (parent directories are created)."""
    atomic_write_bytes(path, text.encode(encoding))


def finite_json(data: Any) -> Any:
    """``data`` with every non-finite float (NaN, +-inf) replaced by ``None``: JSON has no such
    numbers, and other readers (jq, browsers, the Hub) refuse Python's bare ``NaN``."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: finite_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [finite_json(v) for v in data]
    return data


def atomic_write_json(
    path: str | Path, data: Any, *, indent: int | None = 2, sort_keys: bool = False
) -> None:
    """Write ``data`` as JSON (and a final newline) to ``path`` atomically; a non-finite
    number is written as ``null`` (:func:`finite_json`)."""
    text = json.dumps(finite_json(data), indent=indent, sort_keys=sort_keys, allow_nan=False)
    atomic_write_text(path, text + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a new empty directory next to ``path``, renamed to ``path`` when the block completes
    and deleted if it raises.

    An existing ``path`` is replaced, but only once the new directory is complete: it is moved
    aside, the new one renamed in, and then the old one deleted (put back if the rename fails).
    Callers that must not replace a non-empty ``path`` check that before entering.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _fresh_sibling(path, "", _create_dir)
    try:
        yield tmp
        _usual_modes(tmp)
        if not (path.exists() or path.is_symlink()):
            os.replace(tmp, path)
            return
        trash = _fresh_sibling(path, ".old", _create_dir)
        try:
            os.replace(path, trash / "old")
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(trash / "old", path)
                raise
        finally:
            shutil.rmtree(trash)
            _IN_FLIGHT.discard(trash.name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
        _IN_FLIGHT.discard(tmp.name)


def _process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine (unknown counts as alive: keep its files)."""
    if os.name != "posix":
        return True  # os.kill(pid, 0) would terminate it on Windows
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # someone else's process, or a pid this system cannot hold
    return True


def remove_stale_temporaries(directory: str | Path) -> list[Path]:
    """Delete the temporaries that interrupted atomic writes left in ``directory`` (not in its
    subdirectories) and return them.

    A temporary is stale when the process named by the pid in its name no longer runs, or is
    this process but the write is no longer in flight (an earlier write that raised and could
    not clean up). Those of other live processes are kept: they may still be writing. Only
    names of the form :func:`atomic_output` / :func:`atomic_directory` create are touched.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        match = _TEMPORARY.fullmatch(entry.name)
        if match is None or entry.name in _IN_FLIGHT:
            continue
        pid = int(match["pid"])
        if pid != os.getpid() and _process_alive(pid):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        if not (entry.exists() or entry.is_symlink()):
            removed.append(entry)
    return removed


__all__ = [
    "atomic_directory",
    "atomic_output",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "finite_json",
    "remove_stale_temporaries",
]
