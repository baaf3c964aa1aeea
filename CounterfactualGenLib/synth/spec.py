"""What a synthetic subject is made of: :class:`SubjectSpec` and its vocabulary.

A spec is a small frozen, JSON-serialisable record. Everything random in a subject is
drawn from ``seed`` (anatomy, bias, noise) or ``lesion_seed`` (which lesions), each in
its own independent random stream, so changing one attribute of a spec (lesions,
lesion load, atrophy) leaves every other random draw untouched: that is what makes
exact counterfactual twins possible (see :func:`~CounterfactualGenLib.synth.engine.make_twin`).

Example:
    >>> spec = SubjectSpec(seed=3, target_lesion_ml=10.0, atrophy=DIAGNOSIS_ATROPHY["MCI"])
    >>> SubjectSpec.from_json(spec.to_json()) == spec
    True
    >>> lesion_class(10.0), diagnosis_class(0.5)
    ('moderate', 'MCI')
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import InputError

__all__ = [
    "ANATOMIES",
    "CONTRASTS",
    "LESION_CLASSES",
    "LESION_CLASS_MAX_ML",
    "LESION_CLASS_TARGET_ML",
    "DIAGNOSES",
    "DIAGNOSIS_ATROPHY",
    "PROCEDURAL_KINDS",
    "LibraryLesion",
    "ProceduralLesion",
    "SubjectSpec",
    "lesion_class",
    "diagnosis_class",
    "random_spec",
]

#: Image contrasts the engine renders.
CONTRASTS = ("FLAIR", "T1")
#: Lesion-load classes, in increasing order.
LESION_CLASSES = ("none", "minimal", "moderate", "high")
#: Upper bound (inclusive, ml) of each class; "none" is exactly 0 ml, "high" is > 15 ml.
LESION_CLASS_MAX_ML = {"none": 0.0, "minimal": 5.0, "moderate": 15.0, "high": math.inf}
#: Lesion volume aimed at when a twin is asked for a class (middle of each class).
LESION_CLASS_TARGET_ML = {"none": 0.0, "minimal": 2.5, "moderate": 10.0, "high": 25.0}
#: Diagnosis classes, in increasing order of atrophy.
DIAGNOSES = ("CN", "MCI", "AD")
#: Atrophy level of each named diagnosis (0 = cognitively normal … 1 = AD-like).
DIAGNOSIS_ATROPHY = {"CN": 0.0, "MCI": 0.5, "AD": 1.0}
#: Anatomies a subject can be made from: the ICBM152 2009a population average (smooth folds), or
#: Colin27, one person's brain with individual gyri and sulci, or one of two MS patients' brains from
#: routine clinical scans (``synth/resources.py``).
ANATOMIES = ("icbm152", "colin27", "clinical04", "clinical12")
#: Kinds of procedural (not library-derived) lesions.
PROCEDURAL_KINDS = ("periventricular", "juxtacortical")

#: Largest target lesion volume accepted (the library holds ~480 ml in total).
MAX_TARGET_LESION_ML = 200.0


def lesion_class(lesion_ml: float) -> str:
    """Lesion-load class of a volume: none = 0, minimal ≤ 5, moderate ≤ 15, high > 15 ml.

    Args:
        lesion_ml: total lesion volume in millilitres.

    Returns:
        One of :data:`LESION_CLASSES`.
    """
    if lesion_ml < 0 or not math.isfinite(lesion_ml):
        raise InputError(f"lesion_ml must be a finite volume ≥ 0 ml, got {lesion_ml}.")
    for name in LESION_CLASSES:
        if lesion_ml <= LESION_CLASS_MAX_ML[name]:
            return name
    return LESION_CLASSES[-1]  # pragma: no cover - inf bound catches everything


def diagnosis_class(atrophy: float) -> str:
    """Diagnosis class nearest to an atrophy level: CN < 0.25 ≤ MCI < 0.75 ≤ AD.

    Args:
        atrophy: atrophy level in [0, 1].

    Returns:
        One of :data:`DIAGNOSES`.
    """
    return "CN" if atrophy < 0.25 else ("MCI" if atrophy < 0.75 else "AD")


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise InputError(f"Unknown {name} {value!r}; choose one of {', '.join(choices)}.")


def _check_range(name: str, value: float, lo: float, hi: float) -> None:
    if not isinstance(value, (int, float, np.integer, np.floating)) or not (lo <= float(value) <= hi):
        raise InputError(f"{name} must be a number in [{lo}, {hi}], got {value!r}.")


@dataclass(frozen=True)
class LibraryLesion:
    """Lesions taken from one real patient mask of the lesion library.

    Args:
        library_id: mask id, e.g. ``"patient05"`` (see ``synth.library_ids()``).
        subset_fraction: fraction (0, 1] of the mask's connected components kept; the
            subset is drawn from the spec's lesion seed.
        deform_seed: ``None`` places the components exactly as segmented; an integer
            applies a light random affine (±15 % size per axis, ±15° rotation) to each
            component about its own centre, drawn from this seed.
    """

    library_id: str
    subset_fraction: float = 1.0
    deform_seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.library_id, str) or not self.library_id:
            raise InputError(f"library_id must be a mask id such as 'patient05', got {self.library_id!r}.")
        if not isinstance(self.subset_fraction, (int, float)) or not (0.0 < float(self.subset_fraction) <= 1.0):
            raise InputError(f"subset_fraction must be in (0, 1], got {self.subset_fraction!r}.")
        if self.deform_seed is not None and not isinstance(self.deform_seed, (int, np.integer)):
            raise InputError(f"deform_seed must be an integer or None, got {self.deform_seed!r}.")


@dataclass(frozen=True)
class ProceduralLesion:
    """A synthetic ovoid lesion with an irregular border.

    Args:
        kind: ``"periventricular"`` (1–6 mm from the lateral ventricles) or
            ``"juxtacortical"`` (white matter 1.5–4 mm from the cortex).
        radius_mm: mean radius; the three semi-axes vary ±30 % around it.
        center_mm: centre in template (MNI) millimetres; ``None`` draws a location of
            the right kind from ``seed``.
        seed: seed of the location, shape and orientation.
    """

    kind: str
    radius_mm: float = 3.0
    center_mm: tuple[float, float, float] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("procedural lesion kind", self.kind, PROCEDURAL_KINDS)
        _check_range("radius_mm", self.radius_mm, 0.5, 20.0)
        if self.center_mm is not None:
            c = tuple(float(v) for v in self.center_mm)
            if len(c) != 3 or not all(math.isfinite(v) for v in c):
                raise InputError(f"center_mm must be three finite MNI coordinates, got {self.center_mm!r}.")
            object.__setattr__(self, "center_mm", c)
        if not isinstance(self.seed, (int, np.integer)):
            raise InputError(f"seed must be an integer, got {self.seed!r}.")


@dataclass(frozen=True)
class SubjectSpec:
    """Everything that defines one synthetic subject (JSON-serialisable, hashable).

    Args:
        seed: seed of the anatomy (random smooth deformation, global size/pose, tissue
            contrast jitter, texture), the bias field and the noise.
        library_lesions: lesions copied from real lesion-library masks.
        procedural_lesions: synthetic ovoid lesions.
        target_lesion_ml: ``None`` places exactly the listed lesions. A number makes
            the engine take the listed lesions followed by a seeded pool of library
            lesion parts and procedural lesions, and keep the shortest-fitting prefix
            whose volume on the output grid is closest to this value (and in the same
            lesion-load class). Prefixes are nested, so larger targets give supersets.
        lesion_scale: linear size factor applied to every lesion about its own centre.
        lesion_seed: seed of the lesion choices; ``None`` uses ``seed``. Varying it
            gives the same person with a different lesion pattern.
        atrophy: 0 = cognitively normal … 1 = AD-like (ventricular enlargement and
            cortical thinning); see :data:`DIAGNOSIS_ATROPHY`.
        contrast: ``"FLAIR"`` or ``"T1"``.
        noise_sigma: Rician noise σ in image units (white matter ≈ 0.55 FLAIR / 0.8 T1).
        bias_strength: standard deviation of the log bias field (0 = none).
        deform_mm: standard deviation of the random anatomical displacement in mm.
        anatomy: the brain the subject is deformed from (:data:`ANATOMIES`); a twin keeps it.
    """

    seed: int
    library_lesions: tuple[LibraryLesion, ...] = ()
    procedural_lesions: tuple[ProceduralLesion, ...] = ()
    target_lesion_ml: float | None = None
    lesion_scale: float = 1.0
    lesion_seed: int | None = None
    atrophy: float = 0.0
    contrast: str = "FLAIR"
    noise_sigma: float = 0.02
    bias_strength: float = 0.15
    deform_mm: float = 2.0
    anatomy: str = "icbm152"

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise InputError(f"seed must be an integer ≥ 0, got {self.seed!r}.")
        object.__setattr__(self, "seed", int(self.seed))
        if self.lesion_seed is not None:
            if not isinstance(self.lesion_seed, (int, np.integer)) or self.lesion_seed < 0:
                raise InputError(f"lesion_seed must be an integer ≥ 0 or None, got {self.lesion_seed!r}.")
            object.__setattr__(self, "lesion_seed", int(self.lesion_seed))
        # Accept lists/dicts (e.g. from JSON) but store hashable tuples of dataclasses.
        lib = tuple(x if isinstance(x, LibraryLesion) else LibraryLesion(**x) for x in self.library_lesions)
        proc = tuple(x if isinstance(x, ProceduralLesion) else ProceduralLesion(**x) for x in self.procedural_lesions)
        object.__setattr__(self, "library_lesions", lib)
        object.__setattr__(self, "procedural_lesions", proc)
        if self.target_lesion_ml is not None:
            _check_range("target_lesion_ml", self.target_lesion_ml, 0.0, MAX_TARGET_LESION_ML)
            object.__setattr__(self, "target_lesion_ml", float(self.target_lesion_ml))
        _check_range("lesion_scale", self.lesion_scale, 0.25, 3.0)
        _check_range("atrophy", self.atrophy, 0.0, 1.0)
        _check_choice("contrast", self.contrast, CONTRASTS)
        _check_range("noise_sigma", self.noise_sigma, 0.0, 1.0)
        _check_range("bias_strength", self.bias_strength, 0.0, 1.0)
        _check_range("deform_mm", self.deform_mm, 0.0, 10.0)
        _check_choice("anatomy", self.anatomy, ANATOMIES)
        for name in ("lesion_scale", "atrophy", "noise_sigma", "bias_strength", "deform_mm"):
            object.__setattr__(self, name, float(getattr(self, name)))

    @property
    def effective_lesion_seed(self) -> int:
        """The seed of the lesion choices (``lesion_seed``, else ``seed``)."""
        return self.seed if self.lesion_seed is None else self.lesion_seed

    @property
    def diagnosis(self) -> str:
        """Diagnosis class of :attr:`atrophy` (CN / MCI / AD)."""
        return diagnosis_class(self.atrophy)

    def replace(self, **changes: Any) -> "SubjectSpec":
        """A copy with some fields changed (validated like the constructor)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of JSON types (tuples become lists)."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """Compact JSON text of :meth:`to_dict` (keys sorted, so equal specs give equal text)."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "SubjectSpec":
        """Inverse of :meth:`to_dict`; unknown keys are an :class:`InputError`."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"Unknown SubjectSpec field(s) {unknown}; valid fields are {sorted(names)}.")
        return cls(**dict(data))

    @classmethod
    def from_json(cls, text: str) -> "SubjectSpec":
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"SubjectSpec JSON is not valid JSON: {exc}") from None
        if not isinstance(data, dict):
            raise InputError("SubjectSpec JSON must be an object.")
        return cls.from_dict(data)


#: Lesion volume ranges (ml) that :func:`random_spec` draws from for each class.
_RANDOM_TARGET_RANGE_ML = {"none": (0.0, 0.0), "minimal": (0.8, 4.5), "moderate": (6.0, 14.0), "high": (17.0, 45.0)}


def random_spec(
    rng: np.random.Generator | int | None = None,
    *,
    lesion_class: str | None = None,
    diagnosis: str | None = None,
    contrast: str = "FLAIR",
    anatomy: str | Sequence[str] = "icbm152",
) -> SubjectSpec:
    """A random subject spec, e.g. for training data generated on the fly.

    Args:
        rng: a numpy Generator or an integer seed (``None``: fresh entropy).
        lesion_class: fix the lesion-load class; ``None`` draws one uniformly.
        diagnosis: fix the diagnosis (CN / MCI / AD); ``None`` draws one uniformly.
            The atrophy level is the diagnosis' level ± 0.15 (clipped to [0, 1]).
        contrast: ``"FLAIR"`` or ``"T1"``.
        anatomy: one of :data:`ANATOMIES`, or several to draw one uniformly (drawn last, so the
            other fields are those a single anatomy gives for the same ``rng``).

    Returns:
        A :class:`SubjectSpec` with ``target_lesion_ml`` inside the class range.

    Example:
        >>> random_spec(7, lesion_class="high").target_lesion_ml > 15
        True
    """
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    if lesion_class is None:
        lesion_class = LESION_CLASSES[int(gen.integers(len(LESION_CLASSES)))]
    _check_choice("lesion class", lesion_class, LESION_CLASSES)
    if diagnosis is None:
        diagnosis = DIAGNOSES[int(gen.integers(len(DIAGNOSES)))]
    _check_choice("diagnosis", diagnosis, DIAGNOSES)
    _check_choice("contrast", contrast, CONTRASTS)
    lo, hi = _RANDOM_TARGET_RANGE_ML[lesion_class]
    target = float(gen.uniform(lo, hi)) if hi > 0 else 0.0
    choices = (anatomy,) if isinstance(anatomy, str) else tuple(anatomy)
    if not choices:
        raise InputError(f"anatomy: name at least one of {', '.join(ANATOMIES)}.")
    for a in choices:
        _check_choice("anatomy", a, ANATOMIES)
    atrophy = float(np.clip(DIAGNOSIS_ATROPHY[diagnosis] + gen.uniform(-0.15, 0.15), 0.0, 1.0))
    fields = dict(
        seed=int(gen.integers(2**31 - 1)),
        target_lesion_ml=round(target, 3),
        lesion_scale=round(float(gen.uniform(0.85, 1.15)), 3),
        atrophy=round(atrophy, 3),
        contrast=contrast,
        noise_sigma=round(float(gen.uniform(0.01, 0.035)), 4),
        bias_strength=round(float(gen.uniform(0.05, 0.25)), 3),
    )
    return SubjectSpec(**fields, anatomy=choices[int(gen.integers(len(choices)))] if len(choices) > 1 else choices[0])

