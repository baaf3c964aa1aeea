"""Tabular → text prompts, paraphrase augmentation, and prompt → class parsing.

Stage 1 of PRISM (Kumar et al., MIDL 2025) turns a table of labels into a sentence per
scan; Imagining Alternatives (Mohamed et al., arXiv 2509.05978) conditions a 3D
diffusion model on exactly such sentences ("Subject has high lesion load.",
"Subject has mild cognitive impairment (MCI)."). This module owns those sentences:

* :func:`row_to_prompt` builds the canonical prompt of one table row (lesion volume in
  ml, diagnosis, optional age/sex/EDSS clauses) under a :class:`PromptConfig`.
* :func:`paraphrase` rewrites a canonical prompt with hand-written templates, so a
  model trained on the augmented prompts also answers free-form wording.
* :func:`classify_prompt` maps any (free-form) prompt back to its lesion-load and
  diagnosis classes by keyword rules; it is used by text-alignment metrics and to pick
  a default source prompt for an edit.

Example:
    >>> row_to_prompt({"lesion_ml": 20.0})
    'Subject has high lesion load.'
    >>> classify_prompt("MRI of a patient with a heavy white-matter lesion burden")
    {'lesion_load': 'high', 'diagnosis': None}

Nothing here imports torch: prompt handling must stay cheap for the CLI and Slicer.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..errors import InputError

__all__ = [
    "LESION_LOAD_CLASSES",
    "DIAGNOSIS_CLASSES",
    "LESION_PROMPTS",
    "DIAGNOSIS_PROMPTS",
    "LESION_PARAPHRASES",
    "DIAGNOSIS_PARAPHRASES",
    "DIAGNOSIS_ALIASES",
    "LesionLoadThresholds",
    "PromptConfig",
    "MS_PROMPT_CONFIG",
    "ADNI_PROMPT_CONFIG",
    "lesion_load_class",
    "normalise_diagnosis",
    "canonical_prompt",
    "row_to_prompt",
    "paraphrase",
    "classify_prompt",
    "unrecognised_prompt_warning",
]

# ---------------------------------------------------------------------------------------
# Canonical prompts
# ---------------------------------------------------------------------------------------

LESION_LOAD_CLASSES: tuple[str, ...] = ("none", "minimal", "moderate", "high")
DIAGNOSIS_CLASSES: tuple[str, ...] = ("CN", "MCI", "AD")

#: Canonical lesion-load prompts. "minimal/moderate/high" are the MS prompts of
#: Imagining Alternatives; "none" is added so that lesion removal has a target.
LESION_PROMPTS: dict[str, str] = {
    "none": "Subject has no lesions.",
    "minimal": "Subject has minimal lesion load.",
    "moderate": "Subject has moderate lesion load.",
    "high": "Subject has high lesion load.",
}

#: Canonical diagnosis prompts, verbatim the ADNI prompts of Imagining Alternatives.
DIAGNOSIS_PROMPTS: dict[str, str] = {
    "CN": "Subject is cognitively normal (CN).",
    "MCI": "Subject has mild cognitive impairment (MCI).",
    "AD": "Subject has mild Alzheimer's dementia (AD).",
}

#: Paraphrase templates per class. The canonical prompt is the first entry, so a
#: uniform draw keeps the canonical wording in the training mix. Every entry must
#: classify back to its own class (checked by the tests).
LESION_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "none": (
        LESION_PROMPTS["none"],
        "Brain MRI with no white-matter lesions.",
        "MRI of a patient without any visible lesions.",
        "Lesion-free brain scan.",
        "No multiple sclerosis lesions are present.",
        "A brain with zero lesion load.",
        "FLAIR scan showing no hyperintense lesions.",
    ),
    "minimal": (
        LESION_PROMPTS["minimal"],
        "MRI of a patient with a low white-matter lesion burden.",
        "Brain scan showing a few small lesions.",
        "Subject has a minimal number of MS lesions.",
        "Mild white-matter lesion load.",
        "Only a few scattered lesions are visible.",
        "Subject has low lesion load.",
    ),
    "moderate": (
        LESION_PROMPTS["moderate"],
        "MRI of a patient with a moderate white-matter lesion burden.",
        "Brain scan showing several lesions.",
        "Subject has an intermediate lesion load.",
        "A moderate number of MS lesions is visible.",
        "Medium white-matter lesion burden.",
    ),
    "high": (
        LESION_PROMPTS["high"],
        "MRI of a patient with a heavy white-matter lesion burden.",
        "Brain scan showing many large lesions.",
        "Extensive multiple sclerosis lesions throughout the white matter.",
        "Subject has a severe lesion load.",
        "Numerous confluent white-matter lesions.",
        "Subject has a large number of lesions.",
    ),
}

DIAGNOSIS_PARAPHRASES: dict[str, tuple[str, ...]] = {
    "CN": (
        DIAGNOSIS_PROMPTS["CN"],
        "Brain MRI of a cognitively healthy subject.",
        "MRI of a healthy control with normal cognition.",
        "Subject shows no cognitive impairment.",
        "A cognitively unimpaired older adult.",
        "Subject is cognitively normal.",
    ),
    "MCI": (
        DIAGNOSIS_PROMPTS["MCI"],
        "MRI of a patient with mild cognitive impairment.",
        "Brain scan of a subject diagnosed with MCI.",
        "A patient with early cognitive decline but no dementia (MCI).",
        "Subject has mild cognitive impairment.",
    ),
    "AD": (
        DIAGNOSIS_PROMPTS["AD"],
        "MRI of a patient with Alzheimer's disease.",
        "Brain scan of a subject with mild dementia due to Alzheimer's disease.",
        "A patient diagnosed with Alzheimer's dementia.",
        "Subject has AD.",
    ),
}

#: Accepted spellings of diagnosis values in tables (upper-cased before lookup).
#: ADNI's EMCI/LMCI are both MCI. "SMC" (subjective memory concern) is deliberately
#: absent: mapping it is a study decision; pass ``diagnosis_aliases`` to decide.
DIAGNOSIS_ALIASES: dict[str, str] = {
    "CN": "CN",
    "NC": "CN",
    "HC": "CN",
    "NL": "CN",
    "NORMAL": "CN",
    "CONTROL": "CN",
    "COGNITIVELY NORMAL": "CN",
    "MCI": "MCI",
    "EMCI": "MCI",
    "LMCI": "MCI",
    "MILD COGNITIVE IMPAIRMENT": "MCI",
    "AD": "AD",
    "DEMENTIA": "AD",
    "ALZHEIMER": "AD",
    "ALZHEIMER'S": "AD",
    "ALZHEIMER'S DISEASE": "AD",
}

_CLAUSES = ("lesion_load", "diagnosis", "age_sex", "edss")


# ---------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionLoadThresholds:
    """Total lesion volume (ml) → lesion-load class; upper bounds are inclusive.

    ``lesion_ml <= none_max_ml`` → "none"; ``<= minimal_max_ml`` → "minimal";
    ``<= moderate_max_ml`` → "moderate"; above → "high".

    Defaults: 0 ml means no lesions at all; 5 ml and 15 ml follow the usual split of
    T2/FLAIR lesion volumes in relapsing MS cohorts (median total volumes of a few ml,
    with > 15 ml counted as a high burden). They are conventions, not standards: set
    them to your cohort's tertiles if you train on your own data.

    Args:
        none_max_ml: largest volume still called "no lesions" (0 → any voxel counts).
        minimal_max_ml: largest volume called "minimal".
        moderate_max_ml: largest volume called "moderate".
    """

    none_max_ml: float = 0.0
    minimal_max_ml: float = 5.0
    moderate_max_ml: float = 15.0

    def __post_init__(self) -> None:
        values = (self.none_max_ml, self.minimal_max_ml, self.moderate_max_ml)
        if any(not math.isfinite(float(v)) for v in values) or self.none_max_ml < 0:
            raise InputError(f"Lesion-load thresholds must be finite and >= 0, got {values}.")
        if not self.none_max_ml < self.minimal_max_ml < self.moderate_max_ml:
            raise InputError(
                "Lesion-load thresholds must increase strictly: "
                f"none_max_ml ({self.none_max_ml}) < minimal_max_ml ({self.minimal_max_ml}) "
                f"< moderate_max_ml ({self.moderate_max_ml})."
            )

    def classify(self, lesion_ml: float) -> str:
        """Return the lesion-load class of a volume in ml (see the class docstring)."""
        return lesion_load_class(lesion_ml, self)


@dataclass(frozen=True)
class PromptConfig:
    """How :func:`row_to_prompt` turns a table row into a prompt.

    Args:
        clauses: clauses that must be present, in output order; each of
            "lesion_load", "diagnosis", "age_sex", "edss". A missing column or empty
            value for one of these raises :class:`InputError`.
        optional_clauses: clauses added (after ``clauses``) only when their columns
            hold a value; missing or empty values are skipped (PRISM treats uncertain
            labels as absent).
        lesion_column: column with the total lesion volume in ml.
        diagnosis_column: column with CN/MCI/AD (or an alias, see ``DIAGNOSIS_ALIASES``).
        age_column: column with the age in years.
        sex_column: column with the sex ("F"/"female"/"M"/"male").
        edss_column: column with the EDSS score (0–10).
        thresholds: lesion volume → class thresholds.
        diagnosis_aliases: extra spellings → "CN"/"MCI"/"AD", merged over the defaults.

    The disease clause comes first by default on purpose: encoders truncate long
    prompts (MiniLM at 32 tokens), and the disease state must never be cut off.
    """

    clauses: tuple[str, ...] = ("lesion_load",)
    optional_clauses: tuple[str, ...] = ()
    lesion_column: str = "lesion_ml"
    diagnosis_column: str = "diagnosis"
    age_column: str = "age"
    sex_column: str = "sex"
    edss_column: str = "edss"
    thresholds: LesionLoadThresholds = field(default_factory=LesionLoadThresholds)
    diagnosis_aliases: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in (*self.clauses, *self.optional_clauses):
            if name not in _CLAUSES:
                raise InputError(f"Unknown prompt clause {name!r}; choose from {list(_CLAUSES)}.")
        both = set(self.clauses) & set(self.optional_clauses)
        if both:
            raise InputError(f"Clauses {sorted(both)} are listed as both required and optional.")
        if not self.clauses and not self.optional_clauses:
            raise InputError("PromptConfig needs at least one clause.")
        for alias, value in self.diagnosis_aliases.items():
            if value not in DIAGNOSIS_CLASSES:
                raise InputError(
                    f"diagnosis_aliases maps {alias!r} to {value!r}; targets must be one of {list(DIAGNOSIS_CLASSES)}."
                )


#: MS cohorts: the lesion-load prompt only (as in Imagining Alternatives).
MS_PROMPT_CONFIG = PromptConfig(clauses=("lesion_load",))
#: ADNI-like cohorts: the diagnosis prompt only (as in Imagining Alternatives).
ADNI_PROMPT_CONFIG = PromptConfig(clauses=("diagnosis",))


# ---------------------------------------------------------------------------------------
# Tabular → text
# ---------------------------------------------------------------------------------------


#: Cell values read as "not recorded" (besides empty cells): what tables and statistics packages write.
MISSING_VALUES = ("nan", "na", "n/a", "n.a.", "none", "null", "missing", "unknown", "-", "--", ".", "?")


def _is_missing(value: Any) -> bool:
    """True for None, NaN (pandas' missing value) and blank strings."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == "" or value.strip().lower() in MISSING_VALUES
    try:
        return math.isnan(float(value))
    except (TypeError, ValueError):
        return False


def _as_float(value: Any, column: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"Column {column!r} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"Column {column!r} must be a finite number, got {value!r}.")
    return number


def lesion_load_class(lesion_ml: float, thresholds: LesionLoadThresholds | None = None) -> str:
    """Classify a total lesion volume.

    Args:
        lesion_ml: total lesion volume in millilitres (>= 0).
        thresholds: class boundaries; defaults to :class:`LesionLoadThresholds()`.

    Returns:
        One of ``LESION_LOAD_CLASSES``.

    Raises:
        InputError: the volume is negative, not finite or not a number.
    """
    t = thresholds or LesionLoadThresholds()
    volume = _as_float(lesion_ml, "lesion_ml")
    if volume < 0:
        raise InputError(f"Lesion volume must be >= 0 ml, got {volume} ml.")
    if volume <= t.none_max_ml:
        return "none"
    if volume <= t.minimal_max_ml:
        return "minimal"
    if volume <= t.moderate_max_ml:
        return "moderate"
    return "high"


def normalise_diagnosis(value: Any, aliases: Mapping[str, str] | None = None) -> str:
    """Map a table's diagnosis value to "CN", "MCI" or "AD".

    Args:
        value: the cell value, e.g. "CN", "emci", "Dementia".
        aliases: extra spellings (upper-case keys) merged over ``DIAGNOSIS_ALIASES``.

    Returns:
        One of ``DIAGNOSIS_CLASSES``.

    Raises:
        InputError: the value is not a known spelling.
    """
    table = dict(DIAGNOSIS_ALIASES)
    table.update({str(k).strip().upper(): v for k, v in (aliases or {}).items()})
    key = str(value).strip().upper()
    if key not in table:
        raise InputError(
            f"Unknown diagnosis {value!r}; expected one of {list(DIAGNOSIS_CLASSES)} "
            f"(or a known alias such as EMCI, LMCI, Dementia). "
            "Map other values with diagnosis_aliases (a training config's data.prompts.diagnosis_aliases)."
        )
    return table[key]


def _normalise_sex(value: Any) -> str:
    key = str(value).strip().lower()
    if key in ("f", "female", "w", "woman"):
        return "female"
    if key in ("m", "male", "man"):
        return "male"
    raise InputError(f"Unknown sex {value!r}; expected F/female or M/male (leave it empty to omit the clause).")


def _age_sex_sentence(age: float | None, sex: str | None) -> str:
    if age is not None:
        years = int(round(age))
        # "an 8-/11-/18-/80-…-year-old": the article follows the spoken number.
        article = "an" if str(years).startswith("8") or years in (11, 18) else "a"
        noun = sex if sex is not None else "subject"
        return f"Subject is {article} {years}-year-old {noun}."
    return f"Subject is {sex}."


def _edss_sentence(edss: float) -> str:
    return f"Subject has an EDSS score of {edss:g}."


def canonical_prompt(*, lesion_load: str | None = None, diagnosis: str | None = None) -> str:
    """Canonical prompt for classes (lesion clause first).

    Args:
        lesion_load: one of ``LESION_LOAD_CLASSES`` or None.
        diagnosis: one of ``DIAGNOSIS_CLASSES`` or None.

    Returns:
        e.g. ``"Subject has high lesion load."``.
    """
    parts = []
    if lesion_load is not None:
        if lesion_load not in LESION_PROMPTS:
            raise InputError(f"Unknown lesion load {lesion_load!r}; choose from {list(LESION_LOAD_CLASSES)}.")
        parts.append(LESION_PROMPTS[lesion_load])
    if diagnosis is not None:
        if diagnosis not in DIAGNOSIS_PROMPTS:
            raise InputError(f"Unknown diagnosis {diagnosis!r}; choose from {list(DIAGNOSIS_CLASSES)}.")
        parts.append(DIAGNOSIS_PROMPTS[diagnosis])
    if not parts:
        raise InputError("canonical_prompt needs lesion_load and/or diagnosis.")
    return " ".join(parts)


def row_to_prompt(row: Mapping[str, Any], config: PromptConfig | None = None) -> str:
    """Turn one table row into its canonical prompt (PRISM stage 1, tabular → text).

    Args:
        row: a mapping of column → value (a dict, a ``csv.DictReader`` row, a pandas
            row via ``row.to_dict()``).
        config: which clauses, columns and thresholds; default :data:`MS_PROMPT_CONFIG`.

    Returns:
        Sentences joined by single spaces, e.g.
        ``"Subject has high lesion load. Subject is a 34-year-old female."``.

    Raises:
        InputError: a required column is missing or empty, a lesion volume is negative
            or not a number, a diagnosis or sex value is unknown, an age or EDSS value
            is out of range.

    Example:
        >>> cfg = PromptConfig(clauses=("diagnosis",), optional_clauses=("age_sex",))
        >>> row_to_prompt({"diagnosis": "LMCI", "age": 71, "sex": "M"}, cfg)
        'Subject has mild cognitive impairment (MCI). Subject is a 71-year-old male.'
    """
    cfg = config or MS_PROMPT_CONFIG
    if not isinstance(row, Mapping):
        raise InputError(f"A row must be a mapping of column → value, got {type(row).__name__}.")

    def value(column: str, required: bool) -> Any:
        if column not in row:
            if required:
                raise InputError(
                    f"Column {column!r} is missing from the row (columns: {sorted(map(str, row))}); "
                    "add it or change the PromptConfig column names."
                )
            return None
        cell = row[column]
        if _is_missing(cell):
            if required:
                raise InputError(f"Column {column!r} is empty in this row; a value is required.")
            return None
        return cell

    sentences: list[str] = []
    for clause in (*cfg.clauses, *cfg.optional_clauses):
        required = clause in cfg.clauses
        if clause == "lesion_load":
            cell = value(cfg.lesion_column, required)
            if cell is not None:
                volume = _as_float(cell, cfg.lesion_column)
                sentences.append(LESION_PROMPTS[lesion_load_class(volume, cfg.thresholds)])
        elif clause == "diagnosis":
            cell = value(cfg.diagnosis_column, required)
            if cell is not None:
                sentences.append(DIAGNOSIS_PROMPTS[normalise_diagnosis(cell, cfg.diagnosis_aliases)])
        elif clause == "age_sex":
            # Required means at least one of the two; either alone still makes a sentence.
            age_cell = value(cfg.age_column, False)
            sex_cell = value(cfg.sex_column, False)
            if age_cell is None and sex_cell is None:
                if required:
                    raise InputError(
                        f"Columns {cfg.age_column!r} and {cfg.sex_column!r} are both missing or empty; "
                        "the age_sex clause needs at least one."
                    )
                continue
            age = None
            if age_cell is not None:
                age = _as_float(age_cell, cfg.age_column)
                if not 0 < age < 130:
                    raise InputError(f"Age must be in (0, 130) years, got {age}.")
            sex = _normalise_sex(sex_cell) if sex_cell is not None else None
            sentences.append(_age_sex_sentence(age, sex))
        elif clause == "edss":
            cell = value(cfg.edss_column, required)
            if cell is not None:
                edss = _as_float(cell, cfg.edss_column)
                if not 0.0 <= edss <= 10.0:
                    raise InputError(f"EDSS must be in [0, 10], got {edss}.")
                sentences.append(_edss_sentence(edss))
    if not sentences:
        used = [c for c in (cfg.lesion_column, cfg.diagnosis_column, cfg.age_column, cfg.sex_column, cfg.edss_column)
                if c in row]
        raise InputError(f"The row gave no prompt: its {used or 'prompt'} cells are all empty or not recorded "
                         f"({', '.join(repr(row[c]) for c in used) or 'none'}).")
    return " ".join(sentences)


# ---------------------------------------------------------------------------------------
# Paraphrase augmentation
# ---------------------------------------------------------------------------------------

_AGE_SEX_RE = re.compile(r"^Subject is an? (\d+)-year-old (female|male|subject)\.$")
_SEX_RE = re.compile(r"^Subject is (female|male)\.$")
_EDSS_RE = re.compile(r"^Subject has an EDSS score of ([0-9.]+)\.$")

_AGE_SEX_TEMPLATES = (
    "Subject is {a} {age}-year-old {noun}.",
    "The patient is {a} {age}-year-old {noun}.",
    "{Age}-year-old {noun}.",
    "A {noun} aged {age}.",
)
_SEX_TEMPLATES = ("Subject is {sex}.", "The patient is {sex}.", "{Sex} subject.")
_EDSS_TEMPLATES = (
    "Subject has an EDSS score of {edss}.",
    "EDSS {edss}.",
    "Expanded Disability Status Scale score of {edss}.",
)

_CANONICAL_TO_TEMPLATES: dict[str, tuple[str, ...]] = {
    **{LESION_PROMPTS[c]: LESION_PARAPHRASES[c] for c in LESION_LOAD_CLASSES},
    **{DIAGNOSIS_PROMPTS[c]: DIAGNOSIS_PARAPHRASES[c] for c in DIAGNOSIS_CLASSES},
}


def _pick(options: Sequence[str], rng: Any) -> str:
    """Uniform choice with either a ``random.Random`` or a ``numpy.random.Generator``."""
    if isinstance(rng, random.Random):
        return rng.choice(list(options))
    if hasattr(rng, "integers"):
        return options[int(rng.integers(len(options)))]
    raise InputError(f"rng must be a random.Random, a numpy Generator or an int seed, got {type(rng).__name__}.")


def _split_sentences(prompt: str) -> list[str]:
    return [s for s in re.split(r"(?<=[.!?])\s+", prompt.strip()) if s]


def paraphrase(prompt: str, rng: random.Random | Any | int) -> str:
    """Rewrite a canonical prompt with randomly drawn hand-written templates.

    Each sentence that is a canonical lesion-load or diagnosis prompt is replaced by a
    template of the same class (the canonical wording is one of the choices); age/sex
    and EDSS sentences from :func:`row_to_prompt` get light rewording; any other
    sentence is kept verbatim, because rewriting free text could change its meaning.
    Training on these paraphrases is what lets free-form prompts work at inference.

    Args:
        prompt: a prompt, typically from :func:`row_to_prompt`.
        rng: ``random.Random``, ``numpy.random.Generator`` or an int seed; the only
            source of randomness, so results are reproducible.

    Returns:
        The paraphrased prompt; :func:`classify_prompt` gives it the same classes.
    """
    if not isinstance(prompt, str):
        raise InputError(f"prompt must be a string, got {type(prompt).__name__}.")
    if isinstance(rng, int) and not isinstance(rng, bool):
        rng = random.Random(rng)
    out: list[str] = []
    for sentence in _split_sentences(prompt):
        templates = _CANONICAL_TO_TEMPLATES.get(sentence)
        if templates is not None:
            out.append(_pick(templates, rng))
            continue
        m = _AGE_SEX_RE.match(sentence)
        if m:
            age, noun = m.group(1), m.group(2)
            article = "an" if age.startswith("8") or age in ("11", "18") else "a"
            template = _pick(_AGE_SEX_TEMPLATES, rng)
            out.append(template.format(a=article, age=age, Age=age, noun=noun))
            continue
        m = _SEX_RE.match(sentence)
        if m:
            sex = m.group(1)
            out.append(_pick(_SEX_TEMPLATES, rng).format(sex=sex, Sex=sex.capitalize()))
            continue
        m = _EDSS_RE.match(sentence)
        if m:
            out.append(_pick(_EDSS_TEMPLATES, rng).format(edss=m.group(1).rstrip(".")))
            continue
        out.append(sentence)
    return " ".join(out)


# ---------------------------------------------------------------------------------------
# Prompt → classes (keyword rules)
# ---------------------------------------------------------------------------------------

_LESION_CONTEXT = re.compile(r"lesion|plaque|hyperintens|\bwmh\b|demyelinat")
_LESION_NONE = [
    re.compile(
        r"\b(no|without|zero|free of|absence of|absent|lacks?|lacking|remove[sd]?|removing|erase[sd]?|eliminate[sd]?)\b"
        r"(\s+[\w'-]+){0,4}?\s+(lesions?|plaques?|hyperintensit(y|ies)|wmh|lesion[\s-](load|burden))\b"
    ),
    re.compile(r"\blesion[\s-]?free\b"),
    re.compile(r"\b(lesions?|plaques?|hyperintensit(y|ies))\s+(are|is)\s+(absent|not (present|seen|visible))\b"),
]
_LESION_LEVELS: dict[str, re.Pattern[str]] = {
    "high": re.compile(
        r"\b(high|higher|heavy|severe|extensive|large|numerous|many|massive|substantial|considerable|"
        r"marked|abundant|widespread|confluent|lots of)\b"
    ),
    "moderate": re.compile(r"\b(moderate|moderately|medium|intermediate|several|modest|average)\b"),
    "minimal": re.compile(r"\b(minimal|minor|few|low|lower|small|slight|mild|little|sparse|scattered|tiny)\b"),
}
# Diagnosis phrases whose adjectives ("mild ...") must not leak into lesion levels.
_DIAGNOSIS_PHRASES = re.compile(
    r"\bmild(ly)?\s+(cognitive(ly)?\s+impair\w*|alzheimer\S*|dementia)|\bcognitive\s+decline\b"
)
_CN_NEGATED_IMPAIRMENT = re.compile(
    r"\b(no|without|not|absence of|free of)\s+(signs?\s+of\s+|any\s+|evidence\s+of\s+)*"
    r"(cognitive\s+impairment|cognitive\s+decline|cognitive\s+deficits?)"
)
_NEGATED_DEMENTIA = re.compile(
    r"\b(no|without|not|absence of|free of)\s+(signs?\s+of\s+|any\s+|evidence\s+of\s+)*"
    r"(dementia|alzheimer'?s?(\s+disease)?|\bad\b)",
    re.IGNORECASE,
)
_MCI = re.compile(r"mild\s+cognitive(ly)?\s+impair|\b[el]?mci\b|cognitive(ly)?\s+impair|cognitive\s+decline|prodromal")
_AD = re.compile(r"alzheimer|dementia")
_AD_ABBREV = re.compile(r"\bAD\b")  # case-sensitive: "ad" is an English word
_CN = re.compile(
    r"cognitively\s+(normal|healthy|unimpaired|intact)|normal\s+cognition|healthy\s+control|"
    r"normal\s+control|cognitively-normal"
)
_CN_ABBREV = re.compile(r"\bCN\b")


def _classify_lesion(text: str) -> str | None:
    t = _DIAGNOSIS_PHRASES.sub(" ", text)
    if not _LESION_CONTEXT.search(t):
        return None
    if any(p.search(t) for p in _LESION_NONE):
        return "none"
    counts = {level: len(p.findall(t)) for level, p in _LESION_LEVELS.items()}
    best = max(counts.values())
    if best == 0:
        return None
    winners = [level for level, n in counts.items() if n == best]
    # A tie ("many small lesions", "moderate to high") is ambiguous: refuse to guess.
    return winners[0] if len(winners) == 1 else None


def _classify_diagnosis(text: str, original: str) -> str | None:
    cn = bool(_CN.search(text) or _CN_ABBREV.search(original) or _CN_NEGATED_IMPAIRMENT.search(text))
    # Remove negated phrases so "no cognitive impairment" / "no dementia" are not read as MCI / AD.
    t = _CN_NEGATED_IMPAIRMENT.sub(" ", text)
    t = _NEGATED_DEMENTIA.sub(" ", t)
    o = _NEGATED_DEMENTIA.sub(" ", original)  # keeps case for the "AD" abbreviation
    t = re.sub(r"cognitively\s+unimpaired", " ", t)
    mci = bool(_MCI.search(t))
    ad = bool(_AD.search(t) or _AD_ABBREV.search(o))
    if cn and (mci or ad):
        return None  # contradictory ("from CN to AD"): no single class
    if mci:
        return "MCI"  # "MCI due to Alzheimer's disease" is still MCI
    if ad:
        return "AD"
    return "CN" if cn else None


def classify_prompt(text: str) -> dict[str, str | None]:
    """Map a (free-form) prompt to its lesion-load and diagnosis classes by keywords.

    Rules, applied per sentence for lesions (so "mild" in "mild Alzheimer's dementia"
    never counts as a lesion level): a lesion word (lesion, plaque, hyperintensity,
    WMH) must be present; a negation ("no/without/free of … lesions", "lesion-free")
    means "none"; otherwise the level with most keyword hits wins and ties give None.
    Diagnosis: MCI phrases win over AD ("MCI due to AD" is MCI); "cognitively normal",
    "healthy control", "no cognitive impairment" or the abbreviation CN give CN; CN
    together with MCI/AD is contradictory and gives None.

    Args:
        text: any prompt.

    Returns:
        ``{"lesion_load": "none"|"minimal"|"moderate"|"high"|None,
        "diagnosis": "CN"|"MCI"|"AD"|None}``.
    """
    if not isinstance(text, str):
        raise InputError(f"prompt must be a string, got {type(text).__name__}.")
    original = " ".join(text.split())
    lowered = original.lower()
    lesion_votes = []
    for sentence in re.split(r"[.;!?\n]+", lowered):
        level = _classify_lesion(sentence)
        if level is not None:
            lesion_votes.append(level)
    lesion = lesion_votes[0] if lesion_votes and len(set(lesion_votes)) == 1 else None
    return {"lesion_load": lesion, "diagnosis": _classify_diagnosis(lowered, original)}


def unrecognised_prompt_warning(text: str) -> str | None:
    """The warning for a prompt that names neither a lesion load nor a diagnosis, or ``None``.

    Models are trained on prompts that name those (the synthetic engine's, or a manifest's
    tabular columns turned into text), and the oracle reads only those. For any other
    sentence the model still returns a volume, but nothing here can say what it means.
    The empty prompt (the unconditional model) is not warned about.
    """
    if not " ".join(str(text).split()):
        return None
    c = classify_prompt(text)
    if c["lesion_load"] is not None or c["diagnosis"] is not None:
        return None
    typos = _typo_hints(text)
    return (f"The prompt '{' '.join(text.split())}' names neither a lesion load (no / minimal / moderate / high) nor a "
            "diagnosis (CN / MCI / AD): nothing here can check what the model makes of it (the oracle reads those "
            "two only), and the bundled model was trained on prompts that name them."
            + (f" Did you mean {', '.join(f'{b!r} for {a!r}' for a, b in typos)}?" if typos else ""))


#: The words the prompt rules know, for spelling hints.
_KNOWN_WORDS = ("subject", "lesion", "lesions", "load", "burden", "plaques", "hyperintensities", "white", "matter",
                "high", "heavy", "severe", "extensive", "moderate", "medium", "minimal", "minor", "mild", "few",
                "cognitively", "normal", "cognitive", "impairment", "alzheimer's", "dementia", "healthy", "control")


def _typo_hints(text: str) -> list[tuple[str, str]]:
    """(word, the known word it is probably a misspelling of), for words of ``text`` the rules do not know."""
    import difflib

    out = []
    for w in re.findall(r"[A-Za-z']+", text.lower()):
        if len(w) < 3 or w in _KNOWN_WORDS or w in ("has", "with", "the", "and", "of", "is", "no", "a", "an"):
            continue
        close = difflib.get_close_matches(w, _KNOWN_WORDS, 1, 0.75)
        if close and (w, close[0]) not in out:
            out.append((w, close[0]))
    return out
