"""Text conditioning: encoders behind one interface, and tabular → text prompts.

``import CounterfactualGenLib.text`` is cheap: torch, transformers and open_clip are
imported only when an encoder is loaded or used.
"""

from __future__ import annotations

from .encoders import (
    BIOMEDCLIP_REPO_ID,
    ENCODER_IDS,
    MINILM_SAFETENSORS_SHA256,
    BiomedCLIPEncoder,
    EmbeddingTableEncoder,
    MiniLMEncoder,
    TextEmbedding,
    TextEncoder,
    TinyHashEncoder,
    hf_hub_cache_dir,
    load_text_encoder,
    load_text_encoder_from_description,
    sha256_file,
    write_embedding_table,
)
from .prompts import (
    ADNI_PROMPT_CONFIG,
    DIAGNOSIS_ALIASES,
    DIAGNOSIS_CLASSES,
    DIAGNOSIS_PARAPHRASES,
    DIAGNOSIS_PROMPTS,
    LESION_LOAD_CLASSES,
    LESION_PARAPHRASES,
    LESION_PROMPTS,
    MS_PROMPT_CONFIG,
    LesionLoadThresholds,
    PromptConfig,
    canonical_prompt,
    classify_prompt,
    lesion_load_class,
    normalise_diagnosis,
    paraphrase,
    row_to_prompt,
)

__all__ = [
    "BIOMEDCLIP_REPO_ID",
    "ENCODER_IDS",
    "MINILM_SAFETENSORS_SHA256",
    "BiomedCLIPEncoder",
    "EmbeddingTableEncoder",
    "MiniLMEncoder",
    "TextEmbedding",
    "TextEncoder",
    "TinyHashEncoder",
    "hf_hub_cache_dir",
    "load_text_encoder",
    "load_text_encoder_from_description",
    "sha256_file",
    "write_embedding_table",
    "ADNI_PROMPT_CONFIG",
    "DIAGNOSIS_ALIASES",
    "DIAGNOSIS_CLASSES",
    "DIAGNOSIS_PARAPHRASES",
    "DIAGNOSIS_PROMPTS",
    "LESION_LOAD_CLASSES",
    "LESION_PARAPHRASES",
    "LESION_PROMPTS",
    "MS_PROMPT_CONFIG",
    "LesionLoadThresholds",
    "PromptConfig",
    "canonical_prompt",
    "classify_prompt",
    "lesion_load_class",
    "normalise_diagnosis",
    "paraphrase",
    "row_to_prompt",
]
