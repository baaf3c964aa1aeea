"""The evaluation oracle: a small 3D CNN that reads lesion load and atrophy class from a scan.

Monteiro et al. (ICLR 2023) measure a counterfactual model's *effectiveness* with a
"pseudo-oracle": a separately trained network that reads the attribute back from the
counterfactual. Ours is trained on the synthetic engine's exact ground truth
(:mod:`CounterfactualGenLib.synth`) and predicts, for images on a model grid in model
intensity units (background −1, brain 99.5th percentile +1):

* a lesion probability map (segmentation head); lesion volume = Σ probability × voxel ml;
* the atrophy class CN / MCI / AD (classification head) and the atrophy level (0 … 1);
* pooled features (global average of the two deepest levels) for an oracle-feature
  Fréchet distance and the directional score.

Format, like a generation model (:mod:`CounterfactualGenLib.models`): a folder with
``oracle.json`` (grid, architecture, classes, training summary, measured metrics, every
weight file's SHA-256) and ``oracle.safetensors``. Loading verifies sizes and hashes
first, reads tensors with safetensors only (never unpickles) and loads strictly.

Example:
    >>> import numpy as np
    >>> from CounterfactualGenLib.geometry import ModelGrid
    >>> oracle = Oracle(OracleSpec(id="demo", grid=ModelGrid((16, 16, 16), 8.0)))
    >>> out = oracle.predict(np.full((2, 16, 16, 16), -1.0, np.float32))
    >>> out["lesion_prob"].shape, out["diagnosis_probs"].shape, len(out["diagnosis"])
    ((2, 16, 16, 16), (2, 3), 2)
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ..errors import InputError, ModelError
from ..geometry import ModelGrid
from ..models import _load_state, _load_strict, _verify_files, _write_state, publish_folder
from ..volume import umask_mode

__all__ = [
    "ORACLE_FORMAT",
    "ORACLE_FORMAT_VERSION",
    "DIAGNOSIS_CLASSES",
    "DEFAULT_ARCHITECTURE",
    "OracleSpec",
    "Oracle",
    "build_oracle_net",
    "save_oracle",
    "load_oracle",
    "load_oracle_spec",
    "to_model_units",
    "resolve_oracle",
    "default_oracle_path",
    "to_grid",
]

ORACLE_FORMAT = "counterfactualgen-oracle"
ORACLE_FORMAT_VERSION = 1
DIAGNOSIS_CLASSES = ("CN", "MCI", "AD")
#: A 4-level U-Net, 8→64 channels: ~0.3 M parameters, trains on one CPU core in minutes at 5 mm.
#: ``volume_head``: the lesion volume is also regressed (log(1 + ml)) from the pooled features.
#: On a 5 mm grid most lesions are sub-voxel, and a sum of segmentation probabilities drifts by
#: several ml on lesion-free brains (measured: 5.4 ml MAE on "none" subjects, 800 iterations);
#: the regressed volume is the oracle's ``lesion_ml`` when the head exists.
#: The volume head predicts log(1 + ml) as LOG_ML_CENTER + LOG_ML_SCALE × output (targets 0 … 45 ml ↦ ≈ ±1.3).
LOG_ML_CENTER, LOG_ML_SCALE = 1.75, 1.5
DEFAULT_ARCHITECTURE: dict[str, Any] = {"kind": "unet3d-dual-head", "channels": [8, 16, 32, 64], "head_hidden": 32,
                                        "dropout": 0.1, "norm_groups": 4, "volume_head": True}


@dataclass
class OracleSpec:
    """The JSON spec of an oracle (everything needed to rebuild and use it)."""

    id: str
    grid: ModelGrid
    architecture: dict[str, Any] = field(default_factory=lambda: dict(DEFAULT_ARCHITECTURE))
    classes: list[str] = field(default_factory=lambda: list(DIAGNOSIS_CLASSES))
    contrast: str = "FLAIR"
    intensity: dict[str, Any] = field(default_factory=lambda: {"upper_percentile": 99.5, "out_range": [-1.0, 1.0]})
    description: str = ""
    licence: str = "Apache-2.0"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    #: Which estimate is ``lesion_ml``: "segmentation" (Σ p × voxel ml) or "volume_head" (regressed).
    #: Training measures both on held-out subjects and keeps the better (``Training/train_oracle.py``).
    lesion_ml_from: str = "segmentation"
    #: Monotone piecewise-linear map raw estimate → ml, ``{"x": [...], "y": [...]}`` (knots,
    #: x increasing, y non-decreasing), fitted by isotonic regression on calibration subjects
    #: that are neither training nor validation subjects; ``None`` = no calibration.
    lesion_ml_calibration: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if self.lesion_ml_from not in ("segmentation", "volume_head"):
            raise ModelError(f"lesion_ml_from must be 'segmentation' or 'volume_head'; got {self.lesion_ml_from!r}.")
        if self.lesion_ml_calibration is not None:
            c = self.lesion_ml_calibration
            x, y = np.asarray(c.get("x", []), float), np.asarray(c.get("y", []), float)
            if (x.ndim != 1 or x.shape != y.shape or len(x) < 2 or not np.isfinite(x).all()
                    or not np.isfinite(y).all() or (np.diff(x) <= 0).any() or (np.diff(y) < 0).any()):
                raise ModelError("lesion_ml_calibration needs ≥ 2 knots with x strictly increasing and y "
                                 "non-decreasing, all finite.")
        self.architecture = {**DEFAULT_ARCHITECTURE, **dict(self.architecture)}  # stored complete
        if self.architecture.get("kind", "unet3d-dual-head") != "unet3d-dual-head":
            raise ModelError(f"Unknown oracle architecture {self.architecture.get('kind')!r}; "
                             "expected 'unet3d-dual-head'. Update CounterfactualGen.")
        if list(self.classes) != list(DIAGNOSIS_CLASSES):
            raise ModelError(f"Oracle classes must be {list(DIAGNOSIS_CLASSES)}; got {self.classes}.")

    @property
    def voxel_ml(self) -> float:
        return float(self.grid.spacing_mm) ** 3 / 1000.0

    def to_dict(self) -> dict[str, Any]:
        return {"format": ORACLE_FORMAT, "format_version": ORACLE_FORMAT_VERSION, "id": self.id,
                "description": self.description, "contrast": self.contrast, "grid": self.grid.to_dict(),
                "intensity": self.intensity, "architecture": self.architecture, "classes": list(self.classes),
                "lesion_ml_from": self.lesion_ml_from, "lesion_ml_calibration": self.lesion_ml_calibration,
                "outputs": {"lesion_prob": "sigmoid per voxel", "lesion_ml_seg": "sum(lesion_prob) * voxel_ml",
                            "lesion_ml_volume_head": "expm1 of the regressed log(1 + ml) (volume head only)",
                            "lesion_ml": f"the {self.lesion_ml_from} estimate (lesion_ml_from)"
                                         + (", calibrated (lesion_ml_calibration)" if self.lesion_ml_calibration else ""),
                            "lesion_ml_raw": "the uncalibrated estimate",
                            "diagnosis_probs": "softmax over classes", "atrophy": "regressed level in [0, 1]",
                            "features": "global average pool of the two deepest encoder levels"},
                "training": self.training, "metrics": self.metrics, "licence": self.licence, "files": self.files}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "OracleSpec":
        if d.get("format") != ORACLE_FORMAT:
            raise ModelError(f"Not a CounterfactualGen oracle spec (format={d.get('format')!r}).")
        if int(d.get("format_version", 0)) > ORACLE_FORMAT_VERSION:
            raise ModelError(f"This oracle uses format version {d.get('format_version')}, newer than this software "
                             f"supports ({ORACLE_FORMAT_VERSION}). Update CounterfactualGen.")
        try:
            # Oracles saved before the volume head existed have no "volume_head" key: they had none.
            return cls(id=str(d["id"]), grid=ModelGrid.from_dict(d["grid"]),
                       architecture={"volume_head": False, **dict(d["architecture"])},
                       classes=list(d.get("classes") or DIAGNOSIS_CLASSES), contrast=str(d.get("contrast", "FLAIR")),
                       intensity=dict(d.get("intensity") or {}), description=str(d.get("description", "")),
                       licence=str(d.get("licence", "")), training=dict(d.get("training") or {}),
                       metrics=dict(d.get("metrics") or {}), files=list(d.get("files") or []),
                       lesion_ml_from=str(d.get("lesion_ml_from", "segmentation")),
                       lesion_ml_calibration=d.get("lesion_ml_calibration"))
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise ModelError(f"The oracle spec is incomplete or malformed ({type(exc).__name__}: {exc}).") from None


# ---------------------------------------------------------------------------------
# the network
# ---------------------------------------------------------------------------------
def build_oracle_net(architecture: Mapping[str, Any] | None = None):
    """The oracle network: a small 3D U-Net with a segmentation and a classification head.

    Levels have ``channels`` features; each has two 3×3×3 conv + GroupNorm + LeakyReLU
    layers; max-pooling down, trilinear upsampling + skip concatenation up. Inputs are
    padded to a multiple of 2^(levels−1) and outputs cropped back, so any grid works.

    Returns:
        ``torch.nn.Module`` mapping (B, 1, *grid) → dict(lesion_logit (B, 1, *grid),
        diagnosis_logits (B, 3), atrophy (B,), features (B, F)).
    """
    import torch
    from torch import nn
    import torch.nn.functional as F

    cfg = {**DEFAULT_ARCHITECTURE, **dict(architecture or {})}
    ch = [int(c) for c in cfg["channels"]]
    groups = int(cfg["norm_groups"])
    if len(ch) < 2 or any(c % min(groups, c) for c in ch):
        raise ModelError(f"Oracle channels must be ≥ 2 levels, each divisible by norm_groups; got {ch}.")

    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv3d(cin, cout, 3, padding=1), nn.GroupNorm(min(groups, cout), cout), nn.LeakyReLU(0.1, inplace=True),
            nn.Conv3d(cout, cout, 3, padding=1), nn.GroupNorm(min(groups, cout), cout), nn.LeakyReLU(0.1, inplace=True))

    class OracleNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.down = nn.ModuleList([block(1 if i == 0 else ch[i - 1], c) for i, c in enumerate(ch)])
            self.up = nn.ModuleList([block(ch[i + 1] + ch[i], ch[i]) for i in range(len(ch) - 1)])
            self.seg = nn.Conv3d(ch[0], 1, 1)
            self.n_features = ch[-1] + ch[-2]
            hidden = int(cfg["head_hidden"])
            self.head = nn.Sequential(nn.Dropout(float(cfg["dropout"])), nn.Linear(self.n_features, hidden),
                                      nn.LeakyReLU(0.1), nn.Linear(hidden, len(DIAGNOSIS_CLASSES) + 1))
            # Its own small MLP: sharing the diagnosis head's hidden layer stalled both (measured).
            self.volume_head = bool(cfg.get("volume_head", False))
            self.vol = nn.Sequential(nn.Linear(self.n_features, hidden), nn.LeakyReLU(0.1), nn.Linear(hidden, 1)) \
                if self.volume_head else None
            # Start near the empty map: lesions are < 1 % of voxels.
            nn.init.constant_(self.seg.bias, -4.0)

        def forward(self, x: "torch.Tensor") -> dict[str, "torch.Tensor"]:
            size = x.shape[2:]
            m = 2 ** (len(ch) - 1)
            pad = [(-s) % m for s in size]
            if any(pad):
                x = F.pad(x, (0, pad[2], 0, pad[1], 0, pad[0]), value=-1.0)  # background value in model units
            skips = []
            h = x
            for i, blk in enumerate(self.down):
                if i:
                    h = F.max_pool3d(h, 2)
                h = blk(h)
                skips.append(h)
            feats = torch.cat([skips[-1].mean(dim=(2, 3, 4)), skips[-2].mean(dim=(2, 3, 4))], dim=1)
            for i in reversed(range(len(self.up))):
                h = F.interpolate(h, size=skips[i].shape[2:], mode="trilinear", align_corners=False)
                h = self.up[i](torch.cat([h, skips[i]], dim=1))
            logit = self.seg(h)[:, :, : size[0], : size[1], : size[2]]
            out = self.head(feats)
            k = len(DIAGNOSIS_CLASSES)
            res = {"lesion_logit": logit, "diagnosis_logits": out[:, :k], "atrophy": out[:, k], "features": feats}
            if self.vol is not None:  # standardised log(1 + ml): (y − LOG_ML_CENTER) / LOG_ML_SCALE
                res["lesion_log_ml"] = self.vol(feats)[:, 0] * LOG_ML_SCALE + LOG_ML_CENTER
            return res

    return OracleNet()


# ---------------------------------------------------------------------------------
# the oracle object
# ---------------------------------------------------------------------------------
def fit_calibration(raw_ml: np.ndarray, true_ml: np.ndarray, max_knots: int = 64) -> dict[str, list[float]]:
    """Isotonic regression (SciPy) of true on raw lesion volume, as ≤ ``max_knots`` knots.

    The fitted step function is summarised by the mean raw and fitted value of each
    block (x strictly increasing, y non-decreasing); :func:`apply_calibration`
    interpolates linearly between knots.
    """
    from scipy.optimize import isotonic_regression

    raw_ml, true_ml = np.asarray(raw_ml, float), np.asarray(true_ml, float)
    if raw_ml.shape != true_ml.shape or raw_ml.ndim != 1 or len(raw_ml) < 8:
        raise InputError("Calibration needs ≥ 8 subjects with a raw and a true lesion volume each.")
    order = np.argsort(raw_ml, kind="stable")
    x, fit = raw_ml[order], isotonic_regression(true_ml[order]).x
    blocks = np.split(np.arange(len(x)), np.flatnonzero(np.diff(fit) > 1e-9) + 1)
    while len(blocks) > max_knots:  # merge the two neighbours with the closest fitted values
        gaps = [fit[b[0]] - fit[a[-1]] for a, b in zip(blocks[:-1], blocks[1:])]
        k = int(np.argmin(gaps))
        blocks[k:k + 2] = [np.concatenate(blocks[k:k + 2])]
    kx = [float(x[b].mean()) for b in blocks]
    ky = [float(fit[b].mean()) for b in blocks]
    keep = np.concatenate([[True], np.diff(kx) > 1e-9])
    kx, ky = [v for v, k in zip(kx, keep) if k], [v for v, k in zip(ky, keep) if k]
    if len(kx) < 2:
        kx, ky = [kx[0], kx[0] + 1.0], [ky[0], ky[0] + 1.0]
    return {"x": [round(v, 4) for v in kx], "y": [round(v, 4) for v in np.maximum.accumulate(ky)]}


def apply_calibration(raw_ml: np.ndarray, calibration: Mapping[str, Any] | None) -> np.ndarray:
    """Map raw lesion volumes through a calibration; beyond the last knot, slope 1 (no clamping at the
    largest calibration volume); never below 0."""
    raw = np.asarray(raw_ml, float)
    if not calibration:
        return raw
    x, y = np.asarray(calibration["x"], float), np.asarray(calibration["y"], float)
    out = np.interp(raw, x, y)
    above = raw > x[-1]
    out[above] = y[-1] + (raw[above] - x[-1])
    return np.maximum(out, 0.0)


def to_model_units(image: np.ndarray, brain_mask: np.ndarray, *, upper_percentile: float = 99.5) -> np.ndarray:
    """An image in the oracle's (and generation models') intensity units.

    The same map as ``Training/train_diffusion.py``: :class:`~CounterfactualGenLib.intensity.
    IntensityNormalizer` fitted in the brain mask (background → −1, brain p99.5 → +1), clipped to [−1, 1.5].
    """
    from ..intensity import IntensityNormalizer

    norm = IntensityNormalizer.fit(image, brain_mask, upper_percentile=upper_percentile)
    return np.clip(norm.forward(image), -1.0, 1.5).astype(np.float32)


def to_grid(images: np.ndarray, src_grid: Any, dst_grid: Any) -> np.ndarray:
    """Resample (N, *src) model-unit images onto another grid of the same world (outside → −1)."""
    if src_grid is None or (tuple(src_grid.shape) == tuple(dst_grid.shape)
                            and np.allclose(src_grid.affine_ras, dst_grid.affine_ras)):
        return np.asarray(images, np.float32)
    from ..geometry import resample_linear_index_space  # no SimpleITK: evaluation runs on bare GPU machines too

    m = np.linalg.inv(src_grid.affine_ras) @ dst_grid.affine_ras
    return np.stack([resample_linear_index_space(a, dst_grid.shape, m, default=-1.0) for a in images])


class Oracle:
    """A loaded oracle: spec + network; :meth:`predict` reads lesion load and diagnosis.

    Args:
        spec: the oracle's spec.
        net: the network (default: a freshly built, randomly initialised one).
        path: folder it was loaded from.
    """

    def __init__(self, spec: OracleSpec, net: Any | None = None, path: Path | None = None) -> None:
        self.spec = spec
        self.net = (net if net is not None else build_oracle_net(spec.architecture)).eval()
        self.path = path

    @property
    def id(self) -> str:
        return self.spec.id

    @property
    def grid(self) -> ModelGrid:
        return self.spec.grid

    @property
    def voxel_ml(self) -> float:
        return self.spec.voxel_ml

    @property
    def n_features(self) -> int:
        return int(self.net.n_features)

    def parameter_count(self) -> int:
        return int(sum(p.numel() for p in self.net.parameters()))

    def read(self, images: np.ndarray, grid: ModelGrid | None = None, *, device: str = "cpu") -> dict[str, Any]:
        """:meth:`predict` on images that live on another grid of the same (MNI) world.

        Args:
            images: (N, *grid.shape) or (*grid.shape) in model intensity units.
            grid: the images' grid (``None``: already the oracle's grid). A generation
                model's grid is resampled trilinearly onto the oracle's (outside → −1).
        """
        x = np.asarray(images, np.float32)
        if grid is not None and x.shape == tuple(grid.shape):
            x = x[None]
        return self.predict(to_grid(x, grid, self.grid), device=device)

    def predict(self, images: np.ndarray, *, batch_size: int = 8, device: str = "cpu") -> dict[str, Any]:
        """Read lesion load, diagnosis and features from images on the oracle's grid.

        Args:
            images: (N, *grid) or (*grid) float array in model intensity units.
            batch_size: images per network call.
            device: torch device string.

        Returns:
            ``lesion_ml`` (N,) (``lesion_ml_seg`` or ``lesion_ml_volume_head``, as the spec's
            ``lesion_ml_from`` says), ``lesion_ml_volume_head`` (N,) when the head exists,
            ``lesion_ml_seg`` (N,) = Σ probability × voxel ml, ``lesion_prob`` (N, *grid) float32, ``diagnosis_probs``
            (N, 3), ``diagnosis`` list of N class names, ``atrophy`` (N,), ``features`` (N, F).

        Raises:
            InputError: images not on the oracle's grid or not finite.
        """
        import torch

        x = np.asarray(images, dtype=np.float32)
        if x.shape == tuple(self.grid.shape):
            x = x[None]
        if x.ndim != 4 or tuple(x.shape[1:]) != tuple(self.grid.shape):
            raise InputError(f"The oracle '{self.id}' reads images of shape (N, {', '.join(map(str, self.grid.shape))}) "
                             f"on its {self.grid.spacing_mm} mm grid; got {x.shape}. Resample to the oracle's grid.")
        if not np.isfinite(x).all():
            raise InputError("The images given to the oracle contain NaN or infinite values.")
        self.net.to(device)
        probs, dx, atro, feats, vol = [], [], [], [], []
        with torch.inference_mode():
            for i in range(0, len(x), max(1, int(batch_size))):
                out = self.net(torch.from_numpy(x[i:i + batch_size])[:, None].to(device))
                probs.append(torch.sigmoid(out["lesion_logit"][:, 0]).float().cpu().numpy())
                dx.append(torch.softmax(out["diagnosis_logits"].float(), dim=1).cpu().numpy())
                atro.append(out["atrophy"].float().cpu().numpy())
                feats.append(out["features"].float().cpu().numpy())
                if "lesion_log_ml" in out:
                    vol.append(torch.expm1(out["lesion_log_ml"].float().clamp(min=0.0)).cpu().numpy())
        prob = np.concatenate(probs).astype(np.float32)
        dprobs = np.concatenate(dx)
        seg_ml = prob.reshape(len(prob), -1).sum(axis=1, dtype=np.float64) * self.voxel_ml
        raw = np.concatenate(vol).astype(np.float64) if vol and self.spec.lesion_ml_from == "volume_head" else seg_ml
        return {
            "lesion_ml": apply_calibration(raw, self.spec.lesion_ml_calibration),
            "lesion_ml_raw": raw,
            "lesion_ml_seg": seg_ml,
            **({"lesion_ml_volume_head": np.concatenate(vol).astype(np.float64)} if vol else {}),
            "lesion_prob": prob,
            "diagnosis_probs": dprobs,
            "diagnosis": [self.spec.classes[int(k)] for k in dprobs.argmax(axis=1)],
            "atrophy": np.concatenate(atro),
            "features": np.concatenate(feats),
        }


# ---------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------
def save_oracle(oracle: Oracle, folder: str | os.PathLike, *, dtype: Any | None = None, card: str | None = None,
                overwrite: bool = False) -> Path:
    """Save an oracle folder atomically (temp folder, then rename).

    Args:
        oracle: the oracle.
        folder: destination folder (``oracle.json``, ``oracle.safetensors``, ``ORACLE_CARD.md``).
        dtype: store floating weights in this dtype (e.g. ``torch.float16``).
        card: Markdown card text.
        overwrite: replace an existing folder.
    """
    out = Path(folder)
    if out.exists() and not overwrite:
        raise InputError(f"Oracle folder {out} already exists; pass overwrite=True to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-oracle-", dir=str(out.parent)))
    os.chmod(tmp, umask_mode(directory=True))
    try:
        oracle.spec.files = _write_state(oracle.net.state_dict(), tmp, "oracle", dtype)
        if card is not None:
            (tmp / "ORACLE_CARD.md").write_text(card)
        (tmp / "oracle.json").write_text(json.dumps(oracle.spec.to_dict(), indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    oracle.path = publish_folder(tmp, out)
    return out


def load_oracle_spec(folder: str | os.PathLike) -> OracleSpec:
    """Read and check ``oracle.json`` without touching the weights."""
    p = Path(folder)
    if p.is_file() and p.name == "oracle.json":
        p = p.parent
    spec_path = p / "oracle.json"
    if not spec_path.exists():
        raise ModelError(f"No oracle.json in {p}: not a CounterfactualGen oracle folder "
                         "(train one with Training/train_oracle.py).")
    try:
        d = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{spec_path} is not valid JSON ({exc}).") from None
    return OracleSpec.from_dict(d)


def load_oracle(folder: str | os.PathLike) -> Oracle:
    """Load an oracle folder: verify sizes and SHA-256, read safetensors, build, load strictly.

    Raises:
        ModelError: anything missing, corrupt, tampered or mismatched.
    """
    p = Path(folder)
    if p.is_file():
        p = p.parent
    spec = load_oracle_spec(p)
    _verify_files(p, spec)  # type: ignore[arg-type]  # duck-typed: needs .files only
    try:
        net = build_oracle_net(spec.architecture)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(f"The oracle spec's architecture cannot be built: {exc}") from None
    _load_strict(net, _load_state(p, spec, "oracle"), "oracle")  # type: ignore[arg-type]
    return Oracle(spec, net.float(), path=p)


def default_oracle_path() -> Path:
    """Where the bundled oracle lives (``Resources/Models/oracle-5mm``)."""
    from ..models import RESOURCES

    return RESOURCES / "Models" / "oracle-5mm"


def resolve_oracle(name_or_path: str | None, *, resources: Path | None = None) -> Path:
    """An oracle folder from a path, an oracle's id in ``Resources/Models.json`` (e.g. ``oracle-flair-5mm``),
    or None → the bundled ``Resources/Models/oracle-5mm``."""
    from ..models import RESOURCES, registry

    res = resources or RESOURCES
    p = default_oracle_path() if name_or_path is None else Path(name_or_path).expanduser()
    if name_or_path is not None and not p.exists():
        entries = [e for e in registry(res) if e.get("kind") == "oracle"]
        entry = next((e for e in entries if e.get("id") == name_or_path), None)
        if entry is None:
            ids = [e.get("id") for e in entries]
            raise ModelError(f"No oracle folder or registered oracle called '{name_or_path}'. "
                             f"Registered oracles: {ids or 'none'}.")
        p = res / "Models" / entry["path"]
    if not (p / "oracle.json").exists():
        raise ModelError(f"No oracle at {p}. Train one with Training/train_oracle.py, or pass --oracle FOLDER.")
    return p
