"""Synthetic brain MRI subjects with exact ground truth and exact counterfactual twins.

The project's training data and its exact ground truth: MNI ICBM152 2009a anatomy
(Fonov et al. 2009, 2011) or Colin27's individual brain (Holmes et al. 1998) under random
smooth deformations, atrophy, real MS lesion
shapes from the Ljubljana lesion library (Lesjak et al. 2018) and procedural lesions,
FLAIR/T1 contrast, bias field and Rician noise. See :mod:`.engine` for the model.

Example:
    >>> from CounterfactualGenLib.synth import SubjectSpec, lesion_load_series
    >>> series = lesion_load_series(SubjectSpec(seed=0), ("none", "high"), shape=(32,) * 3, spacing_mm=6.0)
    >>> [s.attributes["lesion_load"] for s in series]
    ['none', 'high']
"""

from .engine import (
    CONTRAST_INTENSITIES,
    DEFAULT_CENTER_MM,
    ENGINE_ID,
    Subject,
    atrophy_series,
    lesion_load_series,
    make_subject,
    make_twin,
    output_grid,
)
from .resources import library_ids, load_lesion_library, load_template, preload, resources_dir
from .spec import (
    ANATOMIES,
    CONTRASTS,
    DIAGNOSES,
    DIAGNOSIS_ATROPHY,
    LESION_CLASS_MAX_ML,
    LESION_CLASS_TARGET_ML,
    LESION_CLASSES,
    PROCEDURAL_KINDS,
    LibraryLesion,
    ProceduralLesion,
    SubjectSpec,
    diagnosis_class,
    lesion_class,
    random_spec,
)

__all__ = [
    "ANATOMIES",
    "CONTRASTS",
    "CONTRAST_INTENSITIES",
    "DEFAULT_CENTER_MM",
    "DIAGNOSES",
    "DIAGNOSIS_ATROPHY",
    "ENGINE_ID",
    "LESION_CLASSES",
    "LESION_CLASS_MAX_ML",
    "LESION_CLASS_TARGET_ML",
    "PROCEDURAL_KINDS",
    "LibraryLesion",
    "ProceduralLesion",
    "Subject",
    "SubjectSpec",
    "atrophy_series",
    "diagnosis_class",
    "lesion_class",
    "lesion_load_series",
    "library_ids",
    "load_lesion_library",
    "load_template",
    "make_subject",
    "make_twin",
    "output_grid",
    "preload",
    "random_spec",
    "resources_dir",
]
