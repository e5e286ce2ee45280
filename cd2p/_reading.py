"""Reading cd2p's own files: a damaged one (truncated, empty, overwritten) is one clear error
that names it, never a parser's traceback.

``with reading(path):`` around ``safe_open`` / ``load_file`` / ``json.loads`` turns the
readers' failures into :class:`DamagedFileError`, a ``ValueError`` that the command line prints
as one line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from safetensors import SafetensorError


class DamagedFileError(ValueError):
    """A file cd2p wrote (or downloaded) that cannot be read back as what it should be."""


@contextmanager
def reading(path: str | Path, fix: str = "write it again") -> Iterator[None]:
    """Report a failure to read ``path`` as :class:`DamagedFileError` naming it; ``fix`` says
    what the user can do (re-download, prepare again...)."""
    try:
        yield
    except SafetensorError as exc:
        size = _size(path)
        raise DamagedFileError(
            f"{path}: not a readable safetensors file ({size}; {exc}): it is damaged or "
            f"truncated; {fix}"
        ) from None
    except json.JSONDecodeError as exc:
        raise DamagedFileError(f"{path}: not valid JSON ({exc}); {fix}") from None
    except UnicodeDecodeError:
        raise DamagedFileError(f"{path}: not text (binary or damaged); {fix}") from None


def _size(path: str | Path) -> str:
    try:
        return f"{Path(path).stat().st_size} bytes"
    except OSError:
        return "unreadable"


__all__ = ["DamagedFileError", "reading"]
