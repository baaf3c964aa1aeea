"""What changed, made visible: montages, difference maps, change labelmaps, lesion statistics."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .volume import Volume

__all__ = ["orthogonal_slices", "montage_png", "CHANGE_LABELS", "MONTAGE_LABEL_CHARS"]

#: Characters of a montage row's label that :func:`montage_png` draws (the rest is cut off).
MONTAGE_LABEL_CHARS = 80

#: Values of the change labelmap and their names (also used for Slicer's colour table).
CHANGE_LABELS = {0: "unchanged", 1: "lesion added", 2: "lesion removed", 3: "other change"}


def _to_ras_canonical(vol: Volume) -> np.ndarray:
    """Reorder axes/flip so i→R, j→A, k→S (display only; nearest axis, no resampling)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(vol.affine_ras)
    return nib.orientations.apply_orientation(vol.array, ornt)


def orthogonal_slices(vol: Volume) -> list[np.ndarray]:
    """Axial, coronal and sagittal mid-slices, oriented for display (anterior/superior up)."""
    a = _to_ras_canonical(vol)
    ci, cj, ck = (s // 2 for s in a.shape)
    axial = np.flipud(a[:, :, ck].T)  # rows: A (top) → P; columns: R → L as radiological? keep R on the left
    coronal = np.flipud(a[:, cj, :].T)
    sagittal = np.flipud(a[ci, :, :].T)
    return [axial, coronal, sagittal]


def montage_png(volumes: Sequence[Volume], labels: Sequence[str], path: str | os.PathLike, *,
                cell_px: int = 160, window: tuple[float, float] | None = None) -> Path:
    """Write a PNG: one row per volume (its label above), three orthogonal mid-slices side by side.

    All rows share one intensity window (default: 0.5–99.5 percentiles over all volumes), so
    differences between members of a series are visible as differences in the picture.
    """
    from PIL import Image, ImageDraw

    if len(volumes) != len(labels):
        raise ValueError("one label per volume")
    if window is None:
        allv = np.concatenate([v.array.ravel() for v in volumes])
        window = (float(np.percentile(allv, 0.5)), float(np.percentile(allv, 99.5)))
    lo, hi = window
    hi = hi if hi > lo else lo + 1.0
    label_h = 18
    rows = []
    for vol, label in zip(volumes, labels):
        cells = []
        for sl in orthogonal_slices(vol):
            g = np.clip((sl - lo) / (hi - lo), 0, 1)
            im = Image.fromarray((g * 255).astype(np.uint8))
            scale = cell_px / max(im.size)
            im = im.resize((max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale))), Image.BILINEAR)
            cell = Image.new("L", (cell_px, cell_px), 0)
            cell.paste(im, ((cell_px - im.size[0]) // 2, (cell_px - im.size[1]) // 2))
            cells.append(cell)
        row = Image.new("L", (3 * cell_px, cell_px + label_h), 0)
        ImageDraw.Draw(row).text((4, 2), label[:MONTAGE_LABEL_CHARS], fill=255)
        for i, c in enumerate(cells):
            row.paste(c, (i * cell_px, label_h))
        rows.append(row)
    out = Image.new("L", (3 * cell_px, len(rows) * (cell_px + label_h)), 0)
    for i, r in enumerate(rows):
        out.paste(r, (0, i * (cell_px + label_h)))
    p = Path(path)
    tmp = p.with_name(".partial-" + p.name)
    out.save(tmp, format="PNG")
    os.replace(tmp, p)
    return p
