"""Tests of tabular → text prompts, paraphrases and prompt classification (text/prompts.py)."""

from __future__ import annotations

import random

import pytest

from CounterfactualGenLib.errors import InputError
from CounterfactualGenLib.text import (
    ADNI_PROMPT_CONFIG,
    DIAGNOSIS_CLASSES,
    DIAGNOSIS_PARAPHRASES,
    DIAGNOSIS_PROMPTS,
    LESION_LOAD_CLASSES,
    LESION_PARAPHRASES,
    LESION_PROMPTS,
    LesionLoadThresholds,
    PromptConfig,
    canonical_prompt,
    classify_prompt,
    lesion_load_class,
    normalise_diagnosis,
    paraphrase,
    row_to_prompt,
)

try:
    from hypothesis import given, settings
    from hypothesis import strategies as st

    HAS_HYPOTHESIS = True
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    HAS_HYPOTHESIS = False

FULL = PromptConfig(clauses=("lesion_load", "diagnosis"), optional_clauses=("age_sex", "edss"))


def test_canonical_prompts_are_the_papers():
    # Imagining Alternatives' prompts, verbatim; "none" is ours.
    assert LESION_PROMPTS == {
        "none": "Subject has no lesions.",
        "minimal": "Subject has minimal lesion load.",
        "moderate": "Subject has moderate lesion load.",
        "high": "Subject has high lesion load.",
    }
    assert DIAGNOSIS_PROMPTS == {
        "CN": "Subject is cognitively normal (CN).",
        "MCI": "Subject has mild cognitive impairment (MCI).",
        "AD": "Subject has mild Alzheimer's dementia (AD).",
    }
    assert canonical_prompt(lesion_load="high", diagnosis="CN") == (
        "Subject has high lesion load. Subject is cognitively normal (CN)."
    )


@pytest.mark.parametrize(
    "lesion_ml, expected",
    [
        (0.0, "none"),
        (1e-9, "minimal"),
        (5.0, "minimal"),
        (5.000001, "moderate"),
        (15.0, "moderate"),
        (15.000001, "high"),
        (250.0, "high"),
    ],
)
def test_default_thresholds_at_boundaries(lesion_ml, expected):
    assert lesion_load_class(lesion_ml) == expected
    assert row_to_prompt({"lesion_ml": lesion_ml}) == LESION_PROMPTS[expected]


def test_custom_thresholds_and_columns():
    t = LesionLoadThresholds(none_max_ml=0.1, minimal_max_ml=2.0, moderate_max_ml=8.0)
    cfg = PromptConfig(lesion_column="wmh_ml", thresholds=t)
    assert row_to_prompt({"wmh_ml": 0.1}, cfg) == LESION_PROMPTS["none"]
    assert row_to_prompt({"wmh_ml": "2.0"}, cfg) == LESION_PROMPTS["minimal"]  # CSV strings are fine
    assert row_to_prompt({"wmh_ml": 8.5}, cfg) == LESION_PROMPTS["high"]
    assert t.classify(3.0) == "moderate"


@pytest.mark.parametrize("bad", [(5.0, 5.0, 15.0), (0.0, 20.0, 15.0), (-1.0, 5.0, 15.0), (0.0, float("nan"), 15.0)])
def test_bad_thresholds(bad):
    with pytest.raises(InputError):
        LesionLoadThresholds(*bad)


def test_diagnosis_rows_and_aliases():
    assert row_to_prompt({"diagnosis": "CN"}, ADNI_PROMPT_CONFIG) == DIAGNOSIS_PROMPTS["CN"]
    assert row_to_prompt({"diagnosis": " lmci "}, ADNI_PROMPT_CONFIG) == DIAGNOSIS_PROMPTS["MCI"]
    assert row_to_prompt({"diagnosis": "Dementia"}, ADNI_PROMPT_CONFIG) == DIAGNOSIS_PROMPTS["AD"]
    cfg = PromptConfig(clauses=("diagnosis",), diagnosis_aliases={"smc": "CN"})
    assert row_to_prompt({"diagnosis": "SMC"}, cfg) == DIAGNOSIS_PROMPTS["CN"]
    assert normalise_diagnosis("EMCI") == "MCI"


def test_full_row_with_optional_clauses():
    row = {"lesion_ml": 20.0, "diagnosis": "AD", "age": 34.4, "sex": "F", "edss": 3.5}
    assert row_to_prompt(row, FULL) == (
        "Subject has high lesion load. Subject has mild Alzheimer's dementia (AD). "
        "Subject is a 34-year-old female. Subject has an EDSS score of 3.5."
    )
    assert row_to_prompt({**row, "age": 81, "sex": "male"}, FULL).count("Subject is an 81-year-old male.") == 1
    assert "an 18-year-old" in row_to_prompt({**row, "age": 18}, FULL)
    assert "Subject is female." in row_to_prompt({**row, "age": None}, FULL)
    assert "Subject is a 60-year-old subject." in row_to_prompt({**row, "age": 60, "sex": ""}, FULL)


@pytest.mark.parametrize("missing", [None, float("nan"), "", "NaN"])
def test_optional_clauses_skip_missing_values(missing):
    row = {"lesion_ml": 1.0, "diagnosis": "CN", "age": missing, "sex": missing, "edss": missing}
    assert row_to_prompt(row, FULL) == "Subject has minimal lesion load. Subject is cognitively normal (CN)."
    assert row_to_prompt({"lesion_ml": 1.0, "diagnosis": "CN"}, FULL) == row_to_prompt(row, FULL)


@pytest.mark.parametrize(
    "row, config, match",
    [
        ({"lesion_ml": -0.5}, None, "must be >= 0"),
        ({"lesion_ml": "lots"}, None, "must be a number"),
        ({"lesion_ml": float("inf")}, None, "finite"),
        ({"lesion_ml": float("nan")}, None, "empty"),
        ({"volume": 3.0}, None, "missing"),
        ({}, ADNI_PROMPT_CONFIG, "missing"),
        ({"diagnosis": "FTD"}, ADNI_PROMPT_CONFIG, "Unknown diagnosis"),
        ({"lesion_ml": 1.0, "diagnosis": "CN", "sex": "x"}, FULL, "Unknown sex"),
        ({"lesion_ml": 1.0, "diagnosis": "CN", "age": -3}, FULL, "Age"),
        ({"lesion_ml": 1.0, "diagnosis": "CN", "edss": 11}, FULL, "EDSS"),
        ({"age": 50}, PromptConfig(clauses=("age_sex",), age_column="years"), "age_sex"),
    ],
)
def test_bad_rows_raise_input_error(row, config, match):
    with pytest.raises(InputError, match=match):
        row_to_prompt(row, config)


def test_bad_configs_and_rows():
    with pytest.raises(InputError):
        PromptConfig(clauses=("lesion_load", "mood"))
    with pytest.raises(InputError):
        PromptConfig(clauses=("diagnosis",), optional_clauses=("diagnosis",))
    with pytest.raises(InputError):
        PromptConfig(diagnosis_aliases={"SMC": "healthy"})
    with pytest.raises(InputError):
        row_to_prompt(["lesion_ml", 3.0])  # type: ignore[arg-type]
    with pytest.raises(InputError):
        row_to_prompt({"lesion_ml": None}, PromptConfig(clauses=(), optional_clauses=("lesion_load",)))


# ---------------------------------------------------------------------------------------
# Paraphrases and classification
# ---------------------------------------------------------------------------------------

ALL_TEMPLATES = [("lesion_load", c, t) for c, ts in LESION_PARAPHRASES.items() for t in ts] + [
    ("diagnosis", c, t) for c, ts in DIAGNOSIS_PARAPHRASES.items() for t in ts
]


@pytest.mark.parametrize("field, cls, template", ALL_TEMPLATES)
def test_every_template_classifies_back(field, cls, template):
    result = classify_prompt(template)
    assert result[field] == cls
    other = "diagnosis" if field == "lesion_load" else "lesion_load"
    assert result[other] is None, "a template must not leak into the other field"


def test_templates_are_varied():
    for table in (LESION_PARAPHRASES, DIAGNOSIS_PARAPHRASES):
        for cls, templates in table.items():
            assert len(set(templates)) == len(templates) >= 5, cls


CLASS_PAIRS = [
    (lesion, diagnosis)
    for lesion in (*LESION_LOAD_CLASSES, None)
    for diagnosis in (*DIAGNOSIS_CLASSES, None)
    if (lesion, diagnosis) != (None, None)
]


@pytest.mark.parametrize("lesion, diagnosis", CLASS_PAIRS)
def test_paraphrases_keep_classes(lesion, diagnosis):
    prompt = canonical_prompt(lesion_load=lesion, diagnosis=diagnosis) + " Subject is an 81-year-old male."
    rng = random.Random(7)
    seen = set()
    for _ in range(40):
        text = paraphrase(prompt, rng)
        seen.add(text)
        assert classify_prompt(text) == {"lesion_load": lesion, "diagnosis": diagnosis}, text
        assert "81" in text and "male" in text
    assert len(seen) > 3, "paraphrases should vary"


def test_paraphrase_is_reproducible_and_accepts_numpy():
    prompt = row_to_prompt({"lesion_ml": 9.0, "diagnosis": "MCI", "age": 70, "sex": "F", "edss": 2}, FULL)
    a = [paraphrase(prompt, random.Random(3)) for _ in range(3)]
    assert len(set(a)) == 1
    assert paraphrase(prompt, 3) == a[0]
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    texts = {paraphrase(prompt, rng) for _ in range(20)}
    assert len(texts) > 1
    for text in texts:
        assert classify_prompt(text) == {"lesion_load": "moderate", "diagnosis": "MCI"}
    with pytest.raises(InputError):
        paraphrase(prompt, "seed")


def test_paraphrase_keeps_unknown_sentences():
    prompt = "Subject has high lesion load. Lesions cluster around the ventricles."
    out = paraphrase(prompt, random.Random(0))
    assert out.endswith("Lesions cluster around the ventricles.")


@pytest.mark.parametrize(
    "text, lesion, diagnosis",
    [
        ("Subject has mild Alzheimer's dementia (AD). Subject has high lesion load.", "high", "AD"),
        ("mild cognitive impairment with many white matter hyperintensities", "high", "MCI"),
        ("patient with MCI due to Alzheimer's disease", None, "MCI"),
        ("no lesions, cognitively normal", "none", "CN"),
        ("Subject has moderate to high lesion load.", None, None),  # ambiguous: no guess
        ("progression from CN to AD", None, None),  # contradictory
        ("Subject has no dementia.", None, None),
        ("A brain MRI.", None, None),
        ("many healthy neurons", None, None),  # a level word without a lesion word
        ("Lesions are absent.", "none", None),
        ("HIGH LESION LOAD", "high", None),
        ("Subject has high lesion load. Subject has no lesions.", None, None),  # sentences disagree
    ],
)
def test_classify_free_form(text, lesion, diagnosis):
    assert classify_prompt(text) == {"lesion_load": lesion, "diagnosis": diagnosis}


def test_classify_rejects_non_strings():
    with pytest.raises(InputError):
        classify_prompt(None)  # type: ignore[arg-type]


@pytest.mark.skipif(not HAS_HYPOTHESIS, reason="needs hypothesis")
def test_row_prompt_round_trip_property():
    order = {c: i for i, c in enumerate(LESION_LOAD_CLASSES)}

    @settings(max_examples=200, deadline=None)
    @given(a=st.floats(0, 1000, allow_nan=False), b=st.floats(0, 1000, allow_nan=False))
    def check(a: float, b: float) -> None:
        lo, hi = sorted((a, b))
        # Monotone: more lesion volume never gives a lower class.
        assert order[lesion_load_class(lo)] <= order[lesion_load_class(hi)]
        # The prompt of a row parses back to the row's class.
        assert classify_prompt(row_to_prompt({"lesion_ml": hi}))["lesion_load"] == lesion_load_class(hi)

    check()
