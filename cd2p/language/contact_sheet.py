"""A contact sheet of captions: for every pair, the RGB frame, a rendering of its point cloud,
the teacher's caption (from the image) and the student's caption (from the points alone), as
a self-contained HTML page or one PNG (``cd2p caption --pairs``)."""

from __future__ import annotations

import base64
import html
import io
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cd2p._atomic import atomic_write_text

SHEET_SUFFIXES = (".html", ".png")
_RENDER_POINTS = 6000  # enough to read a scene, few enough for a light page


@dataclass
class SheetEntry:
    """One row of a contact sheet.

    title: what the row shows (e.g. ``scene0000_00 frame 250``). image: the encoded RGB frame
    (JPEG/PNG bytes) or ``None``. points: ``(N, 3)`` the cloud the student saw. student /
    teacher: the two captions (``teacher`` ``None`` when there is no image).
    """

    title: str
    points: np.ndarray
    student: str
    image: bytes | None = None
    teacher: str | None = None


def printable(text: str) -> str:
    """``text`` with control characters shown as U+FFFD (a GPT-2 can emit any byte; fonts and
    pages cannot show them all)."""
    return "".join(c if c.isprintable() else "\ufffd" for c in text)


def _scatter(ax, points: np.ndarray) -> None:
    """Draw ``points`` on a 3D axis: an oblique view from above, coloured by height (z)."""
    pts = np.asarray(points, dtype=np.float32)
    if len(pts) > _RENDER_POINTS:  # a fixed, evenly spread subset: the same picture every time
        pts = pts[np.linspace(0, len(pts) - 1, _RENDER_POINTS).astype(np.int64)]
    size = float(np.clip(4000 / max(len(pts), 1), 0.6, 8.0))  # sparse clouds get larger dots
    ax.scatter(pts[:, 0], pts[:, 1], pts[:, 2], c=pts[:, 2], cmap="viridis", s=size, linewidths=0)
    low, high = pts.min(0), pts.max(0)
    middle, half = (low + high) / 2, float((high - low).max()) / 2 or 1.0
    ax.set_xlim(middle[0] - half, middle[0] + half)
    ax.set_ylim(middle[1] - half, middle[1] + half)
    ax.set_zlim(middle[2] - half, middle[2] + half)
    ax.view_init(elev=35, azim=-60)
    ax.set_axis_off()


def render_cloud(points: np.ndarray, size: float = 3.0, dpi: int = 100) -> bytes:
    """A PNG (bytes) of a point cloud ``(N, 3)`` seen obliquely from above, coloured by z."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(size, size))
    try:
        _scatter(fig.add_subplot(projection="3d"), points)
        fig.subplots_adjust(0, 0, 1, 1)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=dpi)
    finally:
        plt.close(fig)
    return buffer.getvalue()


def _data_uri(data: bytes) -> str:
    kind = "png" if data[:8] == b"\x89PNG\r\n\x1a\n" else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"


def sheet_html(entries: Sequence[SheetEntry], title: str, notes: Sequence[str] = ()) -> str:
    """The contact sheet as one HTML page with the pictures embedded (no other files)."""
    rows = []
    for entry in entries:
        image = (
            f'<img src="{_data_uri(entry.image)}" alt="RGB frame">' if entry.image else "—"
        )
        cloud = f'<img src="{_data_uri(render_cloud(entry.points))}" alt="point cloud">'
        teacher = html.escape(printable(entry.teacher)) if entry.teacher is not None else "—"
        rows.append(
            f"<tr><td class=name>{html.escape(entry.title)}</td><td>{image}</td>"
            f"<td>{cloud}</td><td class=cap>{teacher}</td>"
            f"<td class=cap>{html.escape(printable(entry.student))}</td></tr>"
        )
    note_html = "".join(f"<p class=note>{html.escape(n)}</p>" for n in notes)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
td, th {{ border: 1px solid #ccc; padding: 6px; vertical-align: middle; }}
img {{ width: 240px; height: auto; display: block; }}
td.cap {{ max-width: 280px; font-size: 15px; }}
td.name {{ font-family: monospace; font-size: 12px; }}
p.note {{ color: #a40; font-weight: bold; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
{note_html}
<table>
<tr><th>pair</th><th>RGB frame</th><th>point cloud (the student's input)</th>
<th>teacher: CLIP + ClipCap on the image</th><th>student: the points alone</th></tr>
{chr(10).join(rows)}
</table>
</body></html>
"""


def _sheet_png(entries: Sequence[SheetEntry], path: Path, title: str, notes: Sequence[str]
               ) -> Path:  # fmt: skip
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from cd2p.engine.metrics_log import save_figure

    fig = plt.figure(figsize=(12, 3.2 * len(entries) + 0.8))
    fig.suptitle("\n".join([title, *notes]), fontsize=11)
    grid = fig.add_gridspec(len(entries), 3, width_ratios=(1, 1, 1.4))
    for row, entry in enumerate(entries):
        ax = fig.add_subplot(grid[row, 0])
        if entry.image:
            ax.imshow(np.asarray(Image.open(io.BytesIO(entry.image)).convert("RGB")))
        ax.set_title(entry.title, fontsize=8)
        ax.set_axis_off()
        _scatter(fig.add_subplot(grid[row, 1], projection="3d"), entry.points)
        ax = fig.add_subplot(grid[row, 2])
        lines = []
        if entry.teacher is not None:
            lines += ["teacher (image):", *textwrap.wrap(printable(entry.teacher), 48), ""]
        lines += ["student (points):", *textwrap.wrap(printable(entry.student), 48)]
        ax.text(0, 0.5, "\n".join(lines), va="center", fontsize=9)
        ax.set_axis_off()
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / (3.2 * len(entries) + 0.8)))
    return save_figure(fig, path, dpi=90)


def write_contact_sheet(
    entries: Sequence[SheetEntry], path: str | Path, title: str, notes: Sequence[str] = ()
) -> Path:
    """Write the sheet as HTML or PNG (by ``path``'s suffix), atomically. ``notes`` are shown
    in bold under the title (e.g. that the teacher is RANDOM)."""
    path = Path(path)
    if path.suffix.lower() not in SHEET_SUFFIXES:
        raise ValueError(f"{path}: a contact sheet is .html or .png")
    if not entries:
        raise ValueError("nothing to put on the contact sheet")
    if path.suffix.lower() == ".png":
        return _sheet_png(entries, path, title, notes)
    atomic_write_text(path, sheet_html(entries, title, notes))
    return path


__all__ = [
    "SHEET_SUFFIXES",
    "SheetEntry",
    "printable",
    "render_cloud",
    "sheet_html",
    "write_contact_sheet",
]
