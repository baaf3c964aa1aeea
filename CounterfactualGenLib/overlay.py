"""What changed, made visible: series montages and edit previews as PNG images.

The difference map, the change labelmap and the lesion statistics of an edit are computed in
:mod:`CounterfactualGenLib.pipeline` (:func:`~CounterfactualGenLib.pipeline.change_labels`); this module
only draws them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .volume import Volume

__all__ = ["montage_png", "edit_preview_png", "CHANGE_LABELS", "CHANGE_COLOURS",
           "MONTAGE_LABEL_CHARS", "OTHER_CHANGE_FULL"]

#: Characters of a montage row's label that :func:`montage_png` draws (the rest is cut off).
MONTAGE_LABEL_CHARS = 80

#: Values of the change labelmap and their names (the Slicer module's colour table, CHANGE_LABELS there, uses the same).
CHANGE_LABELS = {0: "unchanged", 1: "lesion added", 2: "lesion removed", 3: "other change"}
#: RGB colour of each change label in :func:`edit_preview_png`.
CHANGE_COLOURS = {1: (230, 40, 40), 2: (40, 120, 255), 3: (240, 210, 0)}
#: In :func:`edit_preview_png` an "other change" (label 3) is drawn with an opacity that grows with its size,
#: reaching the full overlay opacity at a change of this fraction of the display window: a prompt edit of a
#: real scan touches most of the brain a little (on the bundled clinical FLAIR, 73 % of the brain by a median
#: of 2.7 % of its intensity range), and at one opacity that faint change hid the few strong ones.
OTHER_CHANGE_FULL = 0.10


def _to_ras_canonical(vol: Volume) -> tuple[np.ndarray, np.ndarray]:
    """The array reordered/flipped so i→R, j→A, k→S (display only; nearest axis, no resampling),
    and its voxel sizes (mm) along those axes."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(vol.affine_ras)
    spacing = np.empty(3)
    spacing[ornt[:, 0].astype(int)] = nib.affines.voxel_sizes(vol.affine_ras)
    return nib.orientations.apply_orientation(vol.array, ornt), spacing


#: Letter drawn on the left edge of the axial, coronal and sagittal views of :func:`_cut`.
VIEW_LEFT_LETTERS = ("R", "R", "A")
_LABEL_H = 18  # pixels above each row of a montage for its label


def _cut(a: np.ndarray, center: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices of a RAS-canonical array through ``center``, in the
    radiological convention of Slicer's views: anterior / superior up, the patient's right on the
    image's left, and in the sagittal view anterior on the left."""
    ci, cj, ck = (int(c) for c in center)
    return [a[::-1, ::-1, ck].T, a[::-1, cj, ::-1].T, a[ci, ::-1, ::-1].T]


def _slice_pixel_mm(spacing: np.ndarray) -> list[tuple[float, float]]:
    """(row, column) pixel size in mm of the axial, coronal and sagittal slices of :func:`_cut`."""
    si, sj, sk = (float(v) for v in spacing)
    return [(sj, si), (sk, si), (sk, sj)]


def _window(values: np.ndarray) -> tuple[float, float]:
    """Display window: the 0.5–99.5 percentiles of ``values`` (never empty-width)."""
    lo, hi = float(np.percentile(values, 0.5)), float(np.percentile(values, 99.5))
    return lo, (hi if hi > lo else lo + 1.0)


def _grey(sl: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    lo, hi = window
    return (np.clip((sl - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)


def _cell(sl: np.ndarray, pixel_mm: tuple[float, float], cell_px: int, resample: int) -> "Image.Image":  # noqa: F821
    """One uint8 slice scaled into a ``cell_px`` square at its physical aspect ratio, centred."""
    from PIL import Image

    im = Image.fromarray(sl)
    rows_mm, cols_mm = sl.shape[0] * pixel_mm[0], sl.shape[1] * pixel_mm[1]
    scale = cell_px / max(rows_mm, cols_mm)
    im = im.resize((max(1, round(cols_mm * scale)), max(1, round(rows_mm * scale))), resample)
    cell = Image.new(im.mode, (cell_px, cell_px), 0)
    cell.paste(im, ((cell_px - im.size[0]) // 2, (cell_px - im.size[1]) // 2))
    return cell


def _montage(rows: Sequence[tuple[str, Sequence["Image.Image"]]], cell_px: int, mode: str,  # noqa: F821
             path: str | os.PathLike) -> Path:
    """Write rows of three cells (axial, coronal, sagittal), each row under its label (cut at
    :data:`MONTAGE_LABEL_CHARS`), with the orientation letters; atomically."""
    from PIL import Image, ImageDraw

    white, letter = (255, 255) if mode == "L" else ((255, 255, 255), (255, 255, 0))
    out = Image.new(mode, (3 * cell_px, len(rows) * (cell_px + _LABEL_H)), 0)
    draw = ImageDraw.Draw(out)
    for r, (label, cells) in enumerate(rows):
        y = r * (cell_px + _LABEL_H)
        draw.text((4, y + 2), label[:MONTAGE_LABEL_CHARS], fill=white)
        for k, cell in enumerate(cells):
            out.paste(cell.convert(mode), (k * cell_px, y + _LABEL_H))
            draw.text((k * cell_px + 3, y + _LABEL_H + cell_px // 2 - 6), VIEW_LEFT_LETTERS[k], fill=letter)
    p = Path(path)
    tmp = p.with_name(".partial-" + p.name)
    out.save(tmp, format="PNG")
    os.replace(tmp, p)
    return p


def montage_png(volumes: Sequence[Volume], labels: Sequence[str], path: str | os.PathLike, *,
                cell_px: int = 160, window: tuple[float, float] | None = None) -> Path:
    """Write a PNG: one row per volume (its label above), three orthogonal mid-slices side by side.

    All rows share one intensity window (default: 0.5–99.5 percentiles over all volumes), so
    differences between members of a series are visible as differences in the picture.
    """
    from PIL import Image

    if len(volumes) != len(labels):
        raise ValueError("one label per volume")
    if window is None:
        window = _window(np.concatenate([v.array.ravel() for v in volumes]))
    else:
        window = (window[0], window[1] if window[1] > window[0] else window[0] + 1.0)
    rows = []
    for vol, label in zip(volumes, labels):
        a, spacing = _to_ras_canonical(vol)
        rows.append((label, [_cell(_grey(sl, window), px, cell_px, Image.BILINEAR)
                             for sl, px in zip(_cut(a, [s // 2 for s in a.shape]), _slice_pixel_mm(spacing))]))
    return _montage(rows, cell_px, "L", path)


def edit_preview_png(scan: Volume, counterfactual: Volume, change_labels: Volume, path: str | os.PathLike, *,
                     labels: Sequence[str], cell_px: int = 200, alpha: float = 0.5) -> Path:
    """Quick-look PNG of an edit on the scan's own grid: the scan, the counterfactual, and the
    counterfactual with the change labelmap over it (:data:`CHANGE_COLOURS`).

    Lesions added/removed (labels 1/2) are drawn at opacity ``alpha``; other changes (3) at an
    opacity that grows with |counterfactual − scan| up to ``alpha`` at :data:`OTHER_CHANGE_FULL` of
    the display window, so a faint change over the whole brain does not hide the strong ones.
    The three orthogonal slices pass through the slices with the most lesion labels, else the most
    voxels changed by at least half that much, else the largest total change (the middle of the
    scan when nothing changed), and keep the voxels' physical aspect ratio, so an anisotropic
    clinical scan is not squashed. Both images share the scan's intensity window (0.5–99.5
    percentiles of its non-zero voxels). ``labels``: one per row (3).
    """
    from PIL import Image

    if len(labels) != 3:
        raise ValueError("edit_preview_png takes three row labels (scan, counterfactual, change)")
    shapes = {scan.shape, counterfactual.shape, change_labels.shape}
    if len(shapes) != 1 or not (np.allclose(scan.affine_ras, counterfactual.affine_ras)
                                and np.allclose(scan.affine_ras, change_labels.affine_ras)):
        raise ValueError("the scan, counterfactual and change labels must share one grid")
    a, spacing = _to_ras_canonical(scan)
    c, _ = _to_ras_canonical(counterfactual)
    lab, _ = _to_ras_canonical(Volume(np.asarray(change_labels.array).astype(np.uint8), change_labels.affine_ras))
    step = max(1, int(np.ceil((a.size / 8e6) ** (1 / 3))))  # the window from ≤ 8 M voxels of a huge scan
    sample = a[::step, ::step, ::step]
    nz = sample[sample != 0]
    window = _window(nz if nz.size else sample.ravel())
    # opacity of an "other" change: alpha at OTHER_CHANGE_FULL of the window, less for smaller changes
    weight = np.where(lab > 0, np.clip(np.abs(c.astype(np.float32) - a.astype(np.float32))
                                       / (OTHER_CHANGE_FULL * (window[1] - window[0])), 0.0, 1.0), 0.0)
    weight[(lab == 1) | (lab == 2)] = 1.0
    lesion, strong = (lab == 1) | (lab == 2), weight >= 0.5
    focus = lesion if lesion.any() else strong if strong.any() else weight
    if focus.any():
        center = [int(np.argmax(focus.sum(axis=tuple(j for j in range(3) if j != i)))) for i in range(3)]
    else:
        center = [s // 2 for s in a.shape]
    pixel_mm = _slice_pixel_mm(spacing)

    def cells(img: np.ndarray) -> list:
        return [_cell(_grey(sl, window), px, cell_px, Image.BILINEAR) for sl, px in zip(_cut(img, center), pixel_mm)]

    def overlaid(cell: "Image.Image", label_sl: np.ndarray, weight_sl: np.ndarray,  # noqa: F821
                 px: tuple[float, float]) -> "Image.Image":  # noqa: F821
        rgb = np.repeat(np.asarray(cell, np.float32)[..., None], 3, axis=-1)
        ls = np.asarray(_cell(label_sl, px, cell_px, Image.NEAREST))
        ws = np.asarray(_cell((weight_sl * 255).round().astype(np.uint8), px, cell_px, Image.NEAREST),
                        np.float32)[..., None] / 255.0
        for value, colour in CHANGE_COLOURS.items():
            m = ls == value
            op = alpha * ws[m]
            rgb[m] = (1 - op) * rgb[m] + op * np.asarray(colour, np.float32)
        return Image.fromarray(rgb.round().astype(np.uint8), "RGB")

    cf_cells = cells(c)
    change_cells = [overlaid(cell, ls, ws, px)
                    for cell, ls, ws, px in zip(cf_cells, _cut(lab, center), _cut(weight, center), pixel_mm)]
    return _montage([(labels[0], cells(a)), (labels[1], cf_cells), (labels[2], change_cells)], cell_px, "RGB", path)
