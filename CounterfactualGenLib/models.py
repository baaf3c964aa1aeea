"""Model format: a folder with a JSON spec, safetensors weights and a model card.

```
my-model/
  model.json          spec: architecture, grid, intensity, text encoder, schedule,
                      training summary, licence, metrics, and every weight file's SHA-256
  denoiser.safetensors              (or denoiser-00001-of-00003.safetensors … when split)
  autoencoder.safetensors           (latent family only)
  MODEL_CARD.md       human-readable card (optional)
```
Loading verifies every file's size and SHA-256 before reading it, reads tensors with
``safetensors`` only (never unpickles), builds the networks from the spec and loads
the weights strictly: any missing, extra or mis-shaped tensor is a clear
:class:`~CounterfactualGenLib.errors.ModelError`.

The registry ``Resources/Models.json`` lists the models shipped with the extension;
``resolve_model("id")`` finds one there, ``resolve_model("path/to/folder")`` takes a
folder directly.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from .errors import InputError, ModelError
from .geometry import ModelGrid
from .volume import sha256_file, umask_mode

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "ModelSpec",
    "DiffusionModel",
    "save_model",
    "load_model",
    "load_spec",
    "resolve_model",
    "registry",
    "RESOURCES",
    "MAX_FILE_BYTES",
]

FORMAT = "counterfactualgen-model"
FORMAT_VERSION = 1
#: Weight files are split into parts of at most this size (fits the extension index and transfer limits).
MAX_FILE_BYTES = 15 * 1024 * 1024
RESOURCES = Path(__file__).resolve().parent.parent / "Resources"
FAMILIES = ("wdm", "latent")
#: What a model is shown outside the brain mask of a scan it edits (spec ``intensity.outside_brain``):
#: the scan's own voxels (skull, scalp, noise), or a flat −1 (the normaliser's "no signal") for a model
#: trained indifferent to it (``Training/train_diffusion.py``: ``data.flat_background_prob``).
OUTSIDE_BRAIN = ("scan", "flat")


@dataclass
class ModelSpec:
    """The JSON spec of a model (everything needed to rebuild and use it)."""

    id: str
    family: str
    grid: ModelGrid
    text_encoder: dict[str, Any]
    denoiser: dict[str, Any]
    schedule: dict[str, Any]
    autoencoder: dict[str, Any] | None = None
    wavelet: dict[str, Any] = field(default_factory=lambda: {"low_band_scale": 1.0 / 3.0})
    intensity: dict[str, Any] = field(default_factory=lambda: {"upper_percentile": 99.5, "out_range": [-1.0, 1.0]})
    contrast: str = "FLAIR"
    name: str = ""
    description: str = ""
    licence: str = "Apache-2.0"
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    files: list[dict[str, Any]] = field(default_factory=list)
    template: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelError(f"Unknown model family '{self.family}'; expected one of {FAMILIES}.")
        if self.family == "latent" and not self.autoencoder:
            raise ModelError("A latent-diffusion model needs an 'autoencoder' section in its spec.")
        if self.schedule.get("kind") not in ("rflow", "ddpm"):
            raise ModelError(f"Unknown schedule kind {self.schedule.get('kind')!r}; expected 'rflow' or 'ddpm'.")
        for key in ("default_separation", "default_separation_lesion_load"):
            value = self.schedule.get(key)
            if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                          and 0.0 <= float(value) <= 20.0):
                raise ModelError(f"The model's schedule.{key} must be a number from 0 to 20; got {value!r}.")
        if self.intensity.get("outside_brain", "scan") not in OUTSIDE_BRAIN:
            raise ModelError(f"The model's intensity.outside_brain must be one of {OUTSIDE_BRAIN}; "
                             f"got {self.intensity.get('outside_brain')!r}.")
        if self.family == "wdm" and any(s % 2 for s in self.grid.shape):
            raise ModelError(f"A wavelet model needs an even grid shape; got {self.grid.shape}.")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "format_version": FORMAT_VERSION, "id": self.id, "name": self.name,
            "description": self.description, "family": self.family, "contrast": self.contrast,
            "grid": self.grid.to_dict(), "intensity": self.intensity, "text_encoder": self.text_encoder,
            "denoiser": self.denoiser, "autoencoder": self.autoencoder, "wavelet": self.wavelet,
            "schedule": self.schedule, "template": self.template, "training": self.training,
            "metrics": self.metrics, "licence": self.licence, "files": self.files,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ModelSpec":
        if d.get("format") != FORMAT:
            raise ModelError(f"Not a CounterfactualGen model spec (format={d.get('format')!r}).")
        if int(d.get("format_version", 0)) > FORMAT_VERSION:
            raise ModelError(
                f"This model uses format version {d.get('format_version')}, newer than this software supports "
                f"({FORMAT_VERSION}). Update CounterfactualGen."
            )
        try:
            return cls(
                id=str(d["id"]), family=str(d["family"]), grid=ModelGrid.from_dict(d["grid"]),
                text_encoder=dict(d["text_encoder"]), denoiser=dict(d["denoiser"]), schedule=dict(d["schedule"]),
                autoencoder=dict(d["autoencoder"]) if d.get("autoencoder") else None,
                wavelet=dict(d.get("wavelet") or {"low_band_scale": 1.0 / 3.0}),
                intensity=dict(d.get("intensity") or {}), contrast=str(d.get("contrast", "FLAIR")),
                name=str(d.get("name", "")), description=str(d.get("description", "")),
                licence=str(d.get("licence", "")), training=dict(d.get("training") or {}),
                metrics=dict(d.get("metrics") or {}), files=list(d.get("files") or []),
                template=dict(d.get("template") or {}),
            )
        except (KeyError, TypeError, ValueError, InputError) as exc:
            raise ModelError(f"The model spec is incomplete or malformed ({type(exc).__name__}: {exc}).") from None


# ---------------------------------------------------------------------------------
# the model object
# ---------------------------------------------------------------------------------
class DiffusionModel:
    """A loaded model: spec + denoiser (+ autoencoder) and the map to/from diffusion space.

    Diffusion space is where noise lives: for WDM the 8 orthonormal Haar sub-bands of
    the image (low band scaled by ``wavelet.low_band_scale``, as WDM does, so it stays
    near [−1, 1]); for the latent family the autoencoder's scaled latent.
    """

    def __init__(self, spec: ModelSpec, denoiser: "torch.nn.Module", autoencoder: "torch.nn.Module | None" = None,
                 path: Path | None = None) -> None:
        self.spec = spec
        self.denoiser = denoiser.eval()
        self.autoencoder = autoencoder.eval() if autoencoder is not None else None
        self.path = path

    @property
    def id(self) -> str:
        return self.spec.id

    def to(self, device: "torch.device | str") -> "DiffusionModel":
        self.denoiser.to(device)
        if self.autoencoder is not None:
            self.autoencoder.to(device)
        return self

    @property
    def device(self) -> "torch.device":
        return next(self.denoiser.parameters()).device

    def diffusion_shape(self, batch: int = 1) -> tuple[int, ...]:
        c = int(self.spec.denoiser["in_channels"])
        if self.spec.family == "wdm":
            return (batch, c) + tuple(s // 2 for s in self.spec.grid.shape)
        f = int(self.autoencoder.downsample_factor)  # type: ignore[union-attr]
        return (batch, c) + tuple(s // f for s in self.spec.grid.shape)

    def _band_scale(self, x: "torch.Tensor") -> "torch.Tensor":
        import torch

        s = torch.ones(x.shape[1], device=x.device, dtype=x.dtype)
        n_img = x.shape[1] // 8
        s[:n_img] = float(self.spec.wavelet.get("low_band_scale", 1.0))  # low band first per image channel
        return s.view(1, -1, 1, 1, 1)

    def encode(self, image: "torch.Tensor") -> "torch.Tensor":
        """Image in model units (B, C, *grid) → diffusion space."""
        if self.spec.family == "wdm":
            from .nets.wavelet import haar_dwt3d

            z = haar_dwt3d(image)
            return z * self._band_scale(z)
        return self.autoencoder.encode_latent(image, sample=False)  # type: ignore[union-attr]

    def decode(self, z: "torch.Tensor") -> "torch.Tensor":
        """Diffusion space → image in model units (B, C, *grid)."""
        if self.spec.family == "wdm":
            from .nets.wavelet import haar_idwt3d

            return haar_idwt3d(z / self._band_scale(z))
        return self.autoencoder.decode(z)  # type: ignore[union-attr]

    def template(self, name: str) -> "Any":
        """A template volume shipped with the model (``image``, ``brain_mask``, ``white_matter``).

        Raises:
            ModelError: the model has no such template.
        """
        from .volume import read_volume

        fname = self.spec.template.get(name)
        if not fname or self.path is None:
            raise ModelError(
                f"Model '{self.id}' ships no '{name}' template, which editing a scan needs. "
                "Use a model trained with Training/train_diffusion.py (it writes the templates), "
                "or pass the scan already on the model grid with --registration none."
            )
        return read_volume(self.path / fname, validate=False)

    def parameter_count(self) -> int:
        n = sum(p.numel() for p in self.denoiser.parameters())
        if self.autoencoder is not None:
            n += sum(p.numel() for p in self.autoencoder.parameters())
        return int(n)


# ---------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------
def _build_networks(spec: ModelSpec):
    from .nets.unet import build_denoiser

    try:
        den = build_denoiser(spec.denoiser)
    except ModelError:
        raise
    except Exception as exc:  # MONAI raises ValueError/AssertionError on bad configs
        raise ModelError(f"The model spec's denoiser config cannot be built: {exc}") from None
    ae = None
    if spec.family == "latent":
        from .nets.autoencoder import build_autoencoder

        try:
            ae = build_autoencoder(spec.autoencoder)  # type: ignore[arg-type]
        except ModelError:
            raise
        except Exception as exc:
            raise ModelError(f"The model spec's autoencoder config cannot be built: {exc}") from None
    return den, ae


def publish_folder(tmp: Path, out: Path) -> Path:
    """Move a fully written temp folder into place as ``out`` (replacing it); remove ``tmp`` on failure.

    Readers see the old folder or the new one, never a half-written one.
    """
    try:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _write_state(state: Mapping[str, "torch.Tensor"], folder: Path, stem: str, dtype: "torch.dtype | None") -> list[dict]:
    """Write a state dict as one or more safetensors parts of ≤ MAX_FILE_BYTES."""
    from safetensors.torch import save_file

    parts: list[dict[str, Any]] = []
    chunk: dict[str, Any] = {}
    size = 0
    chunks = []
    for k, v in state.items():
        t = v.detach().to("cpu")
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        t = t.contiguous()
        nbytes = t.numel() * t.element_size()
        if chunk and size + nbytes > MAX_FILE_BYTES:
            chunks.append(chunk)
            chunk, size = {}, 0
        chunk[k] = t
        size += nbytes
    chunks.append(chunk)
    for i, c in enumerate(chunks):
        name = f"{stem}.safetensors" if len(chunks) == 1 else f"{stem}-{i + 1:05d}-of-{len(chunks):05d}.safetensors"
        save_file(c, str(folder / name), metadata={"format": FORMAT})
        os.chmod(folder / name, umask_mode())  # safetensors writes 0600
        parts.append({"name": name, "role": stem, "sha256": sha256_file(folder / name),
                      "bytes": (folder / name).stat().st_size})
    return parts


def save_model(model: DiffusionModel, folder: str | os.PathLike, *, dtype: "torch.dtype | None" = None,
               card: str | None = None, overwrite: bool = False,
               templates: "Mapping[str, Any] | None" = None) -> Path:
    """Save a model folder atomically (written to a temp folder, then renamed).

    Args:
        model: the model.
        folder: destination folder.
        dtype: store floating weights in this dtype (e.g. ``torch.float16`` to halve size).
        card: Markdown model card text (written to MODEL_CARD.md).
        overwrite: replace an existing folder.
        templates: volumes on the model grid that editing needs, by name: ``image`` (the
            average subject in the model's contrast, the registration target),
            ``brain_mask`` and ``white_matter`` (probability or mask). Stored as NIfTI
            files listed (with SHA-256) in the spec.
    """
    out = Path(folder)
    if out.exists() and not overwrite:
        raise InputError(f"Model folder {out} already exists; pass overwrite=True to replace it.")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".partial-model-", dir=str(out.parent)))
    os.chmod(tmp, umask_mode(directory=True))
    try:
        files = _write_state(model.denoiser.state_dict(), tmp, "denoiser", dtype)
        if model.autoencoder is not None:
            files += _write_state(model.autoencoder.state_dict(), tmp, "autoencoder", dtype)
        if templates:
            from .volume import write_volume

            model.spec.template = {}
            for name, vol in templates.items():
                fname = f"template_{name}.nii.gz"
                write_volume(vol, tmp / fname)
                files.append({"name": fname, "role": "template", "sha256": sha256_file(tmp / fname),
                              "bytes": (tmp / fname).stat().st_size})
                model.spec.template[name] = fname
        elif model.path is not None and model.spec.template:  # re-saving a loaded model keeps its templates
            for name, fname in model.spec.template.items():
                shutil.copy2(model.path / fname, tmp / fname)
                files.append({"name": fname, "role": "template", "sha256": sha256_file(tmp / fname),
                              "bytes": (tmp / fname).stat().st_size})
        model.spec.files = files
        if card is not None:
            (tmp / "MODEL_CARD.md").write_text(card)
        (tmp / "model.json").write_text(json.dumps(model.spec.to_dict(), indent=2))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return publish_folder(tmp, out)


def load_spec(folder: str | os.PathLike) -> ModelSpec:
    """Read and check ``model.json`` without touching the weights."""
    p = Path(folder)
    if p.is_file() and p.name == "model.json":
        p = p.parent
    spec_path = p / "model.json"
    if not spec_path.exists():
        raise ModelError(f"No model.json in {p}: not a CounterfactualGen model folder.")
    try:
        d = json.loads(spec_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"{spec_path} is not valid JSON ({exc}).") from None
    return ModelSpec.from_dict(d)


def _verify_files(folder: Path, spec: ModelSpec) -> None:
    if not spec.files:
        raise ModelError(f"The model spec in {folder} lists no weight files.")
    for f in spec.files:
        path = folder / f["name"]
        if Path(f["name"]).name != f["name"]:
            raise ModelError(f"Weight file names must be plain file names; got {f['name']!r}.")
        if not path.exists():
            raise ModelError(f"Weight file {f['name']} listed in model.json is missing from {folder}.")
        if "bytes" in f and path.stat().st_size != int(f["bytes"]):
            raise ModelError(
                f"Weight file {f['name']} has {path.stat().st_size} bytes, the spec says {f['bytes']}: "
                "the file is truncated or was replaced. Re-copy the model."
            )
        digest = sha256_file(path)
        if digest != f.get("sha256"):
            raise ModelError(f"Weight file {f['name']} fails its SHA-256 check (corrupt or tampered). Re-copy the model.")


def _load_state(folder: Path, spec: ModelSpec, role: str) -> dict[str, "torch.Tensor"]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    state: dict[str, Any] = {}
    for f in spec.files:
        if f.get("role", "denoiser") != role:
            continue
        try:
            state.update(load_file(str(folder / f["name"])))
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"Weight file {f['name']} is not a readable safetensors file ({exc}).") from None
    return state


def _load_strict(net: "torch.nn.Module", state: Mapping[str, "torch.Tensor"], what: str) -> None:
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or extra or shapes:
        detail = []
        if missing:
            detail.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if extra:
            detail.append(f"{len(extra)} unexpected (e.g. {extra[0]})")
        if shapes:
            k = shapes[0]
            detail.append(f"{len(shapes)} with wrong shapes (e.g. {k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise ModelError(f"The {what} weights do not match the architecture in model.json: " + "; ".join(detail) + ".")
    net.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=True)


def load_model(folder: str | os.PathLike, *, text_encoder: Any | None = None) -> DiffusionModel:
    """Load a model folder: verify hashes, read safetensors, build, load strictly.

    Args:
        folder: the model folder (or a registry id via :func:`resolve_model` first).
        text_encoder: if given, checked against the spec's encoder id and width.

    Raises:
        ModelError: anything missing, corrupt or mismatched.
    """
    p = Path(folder)
    spec = load_spec(p)
    _verify_files(p, spec)
    if text_encoder is not None:
        check_text_encoder(spec, text_encoder)
    den, ae = _build_networks(spec)
    _load_strict(den, _load_state(p, spec, "denoiser"), "denoiser")
    if ae is not None:
        _load_strict(ae, _load_state(p, spec, "autoencoder"), "autoencoder")
    return DiffusionModel(spec, den, ae, path=p)


def check_text_encoder(spec: ModelSpec, encoder: Any) -> None:
    """Refuse a text encoder the model was not trained with."""
    want_id, want_dim = spec.text_encoder.get("id"), int(spec.text_encoder.get("dim", -1))
    if encoder.encoder_id != want_id or int(encoder.dim) != want_dim:
        raise ModelError(
            f"Model '{spec.id}' was trained with text encoder '{want_id}' (width {want_dim}); "
            f"got '{encoder.encoder_id}' (width {encoder.dim}). Use the model's own encoder."
        )
    if int(spec.denoiser.get("cross_attention_dim", want_dim)) != int(encoder.dim):
        raise ModelError("The denoiser's cross-attention width does not match the text encoder width.")


# ---------------------------------------------------------------------------------
# registry
# ---------------------------------------------------------------------------------
def registry(resources: Path | None = None) -> list[dict[str, Any]]:
    """Entries of ``Resources/Models.json`` (empty list if there is none)."""
    path = (resources or RESOURCES) / "Models.json"
    if not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON ({exc}).") from None
    return list(data.get("models", []))


def default_model_id(resources: Path | None = None) -> str | None:
    path = (resources or RESOURCES) / "Models.json"
    if not path.exists():
        return None
    return json.loads(path.read_text()).get("default")


def resolve_model(name_or_path: str | None, *, resources: Path | None = None) -> Path:
    """A model folder from a path, a registry id, or None (the bundled default)."""
    res = resources or RESOURCES
    if name_or_path is None:
        name_or_path = default_model_id(res)
        if name_or_path is None:
            raise ModelError("No model given and no default model is registered in Resources/Models.json.")
    p = Path(name_or_path).expanduser()
    if p.exists():
        return p
    for entry in registry(res):
        if entry.get("id") == name_or_path and entry.get("kind") != "oracle":
            folder = res / "Models" / entry["path"]
            if not folder.exists():
                raise ModelError(f"Registered model '{name_or_path}' is not installed (expected at {folder}).")
            return folder
    ids = [e.get("id") for e in registry(res) if e.get("kind") != "oracle"]
    raise ModelError(f"No model folder or registered model called '{name_or_path}'. Registered: {ids or 'none'}.")
