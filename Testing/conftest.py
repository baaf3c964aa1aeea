"""Shared fixtures. Tests run on CPU in seconds, on tiny volumes and models they build."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: A real clinical FLAIR exactly as acquired (Ljubljana longitudinal MS set, patient 4, study 1;
#: CC-BY, see NOTICE): 320×320×48, 0.72×0.72×3 mm, oblique, uint16, with skull. It is also the
#: Slicer module's sample data, so the project ships it once.
CLINICAL_FLAIR = ROOT / "Resources" / "SampleData" / "longitudinal_patient04_study1_FLAIR.nii.gz"


def file_sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture
def clinical_flair_path() -> Path:
    if not CLINICAL_FLAIR.exists():
        pytest.skip("clinical test scan not present")
    return CLINICAL_FLAIR


def oblique_affine(rng: np.random.Generator, spacing=(0.72, 0.72, 3.0)) -> np.ndarray:
    """A random rotation, anisotropic spacing and origin: an oblique clinical geometry."""
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    if np.linalg.det(q) < 0:
        q[:, 0] *= -1
    a = np.eye(4)
    a[:3, :3] = q @ np.diag(spacing)
    a[:3, 3] = rng.uniform(-100, 100, 3)
    return a
