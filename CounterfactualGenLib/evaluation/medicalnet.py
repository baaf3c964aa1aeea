"""3D FID features from MedicalNet (Chen et al. 2019, "Med3D") ResNets, with weights the user supplies.

Imagining Alternatives reports realism as a 3D FID on MedicalNet features. The weights are
not ours to ship (and are distributed as pickled ``.pth`` files, which this project never
loads). Convert them once, outside CounterfactualGen, to safetensors::

    python -c "import torch, safetensors.torch as st; \\
               sd = torch.load('resnet_10_23dataset.pth', weights_only=True, map_location='cpu')['state_dict']; \\
               st.save_file({k: v.contiguous() for k, v in sd.items()}, 'resnet_10_23dataset.safetensors')"

(``weights_only=True`` refuses anything but tensors and plain containers, so even the one-off
conversion never runs code from the file.)

and pass ``counterfactualgen evaluate --fid-weights resnet10:resnet_10_23dataset.safetensors``.
The network is MONAI's :class:`monai.networks.nets.ResNet` (spatial_dims 3, one input
channel, shortcut type B, no classifier), whose parameter names match MedicalNet's; the
``module.`` prefix of DataParallel checkpoints and MedicalNet's segmentation decoder
(``conv_seg.*``) are dropped; every other ResNet weight must be present (strict).
Features: the global average pool of the last stage (512 for ResNet-10/18/34, 2048 for 50+),
computed on images in model units rescaled to zero mean / unit variance inside the volume,
as MedicalNet's preprocessing does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError, ModelError

__all__ = ["DEPTHS", "MedicalNetFeatures", "parse_fid_weights"]

DEPTHS = (10, 18, 34, 50, 101, 152, 200)


def parse_fid_weights(arg: str) -> tuple[int, Path]:
    """``"resnet10:PATH"`` → (10, PATH)."""
    name, sep, path = str(arg).partition(":")
    depth = name.lower().removeprefix("resnet")
    if not sep or not depth.isdigit() or int(depth) not in DEPTHS:
        raise InputError(f"--fid-weights must be resnetN:PATH with N in {DEPTHS}; got {arg!r}.")
    p = Path(path).expanduser()
    if p.suffix != ".safetensors":
        raise InputError(f"MedicalNet weights must be a .safetensors file (convert the .pth once; never unpickled "
                         f"here); got {p.name}.")
    if not p.is_file():
        raise InputError(f"No MedicalNet weights at {p}.")
    return int(depth), p


class MedicalNetFeatures:
    """A MedicalNet ResNet feature extractor loaded from safetensors (never from a pickle)."""

    def __init__(self, depth: int, weights: str | Path, *, device: str = "cpu") -> None:
        import torch
        from monai.networks.nets import resnet
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if depth not in DEPTHS:
            raise InputError(f"MedicalNet depth must be one of {DEPTHS}; got {depth}.")
        self.depth, self.path, self.device = int(depth), Path(weights), device
        self.net = getattr(resnet, f"resnet{depth}")(spatial_dims=3, n_input_channels=1, feed_forward=False,
                                                     shortcut_type="B")
        try:
            state = load_file(str(self.path))
        except (SafetensorError, OSError) as exc:
            raise ModelError(f"Cannot read MedicalNet weights {self.path}: {exc}") from None
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state = {k: v for k, v in state.items() if not k.startswith("conv_seg.")}
        own = self.net.state_dict()
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad:
            raise ModelError(f"{self.path.name} is not a MedicalNet ResNet-{depth}: {len(missing)} weights missing "
                             f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}), "
                             f"{len(bad)} of another shape (e.g. {bad[:2]}).")
        self.net.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
        self.net.eval().to(device)
        self._torch = torch

    @property
    def id(self) -> str:
        return f"MedicalNet ResNet-{self.depth} ({self.path.name})"

    def features(self, images: np.ndarray, *, batch_size: int = 4) -> np.ndarray:
        """(N, F) pooled features of (N, D, H, W) images (any intensity units; z-scored per volume)."""
        torch = self._torch
        x = np.asarray(images, np.float32)
        if x.ndim != 4 or not np.isfinite(x).all():
            raise InputError(f"MedicalNet features need finite (N, D, H, W) volumes; got shape {x.shape}.")
        x = (x - x.mean(axis=(1, 2, 3), keepdims=True)) / (x.std(axis=(1, 2, 3), keepdims=True) + 1e-6)
        out = []
        with torch.inference_mode():
            for i in range(0, len(x), batch_size):
                out.append(self.net(torch.from_numpy(x[i:i + batch_size])[:, None].to(self.device)).float().cpu().numpy())
        return np.concatenate(out).astype(np.float64)


def medicalnet_fid(extractor: Any, generated: np.ndarray, reference: np.ndarray) -> dict[str, Any]:
    """3D FID between generated and reference volumes on MedicalNet features."""
    from .metrics import frechet_distance

    fg, fr = extractor.features(generated), extractor.features(reference)
    return {"value": round(frechet_distance(fg, fr), 5), "n_generated": int(len(fg)), "n_reference": int(len(fr)),
            "features": extractor.id}
