"""Pipelines: generate counterfactual series from text (:func:`generate_series`) and edit real scans (:func:`edit_scan`).

The pipeline owns device, dtype, guidance and progress; networks (``nets/``) know
nothing about noise and samplers (``sampling/``) know nothing about networks.

Progress is reported through a callback receiving plain dicts, the same objects the
CLI prints with ``--progress-json``::

    {"event": "progress", "stage": "sample", "step": 3, "total": 30, "eta_s": 12.5}
    {"event": "log", "level": "info", "message": "..."}

Cancellation: pass ``should_cancel`` (polled between sampler steps); a cancelled run
raises :class:`~CounterfactualGenLib.errors.Cancelled`.
"""

from __future__ import annotations

import re
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .errors import Cancelled, InputError, ModelError
from .models import DiffusionModel, check_text_encoder
from .volume import Volume

__all__ = ["Reporter", "select_device", "list_devices", "generate_series", "GeneratedSeries", "OUTPUT_SCALE",
           "read_series", "edit_scan", "EditResult", "to_model_space", "ModelSpaceScan"]

#: Generated images are written with background 0 and the brain's 99.5th percentile at this value.
OUTPUT_SCALE = 1000.0

EventCallback = Callable[[dict], None]


class Reporter:
    """Turns stage/step counts into progress events with an ETA; also times stages."""

    def __init__(self, callback: EventCallback | None = None, should_cancel: Callable[[], bool] | None = None) -> None:
        self.callback = callback
        self.should_cancel = should_cancel
        self.timings_s: dict[str, float] = {}
        self._stage_start: dict[str, float] = {}

    def log(self, message: str, level: str = "info") -> None:
        if self.callback:
            self.callback({"event": "log", "level": level, "message": message})

    def start(self, stage: str, total: int = 1) -> None:
        """Begin a stage; a cancel asked for since the last stage stops the run here (registration, the
        oracle and encoding poll nothing inside)."""
        if self.should_cancel is not None and self.should_cancel():
            raise Cancelled("Cancelled; partial outputs were removed.")
        self._stage_start[stage] = time.perf_counter()
        if self.callback:
            self.callback({"event": "progress", "stage": stage, "step": 0, "total": int(total), "eta_s": None})

    def step(self, stage: str, step: int, total: int) -> None:
        t0 = self._stage_start.setdefault(stage, time.perf_counter())
        elapsed = time.perf_counter() - t0
        eta = elapsed / step * (total - step) if step > 0 else None
        if self.callback:
            self.callback({"event": "progress", "stage": stage, "step": int(step), "total": int(total),
                           "eta_s": None if eta is None else round(eta, 2)})

    def end(self, stage: str) -> float:
        dt = time.perf_counter() - self._stage_start.pop(stage, time.perf_counter())
        self.timings_s[stage] = round(self.timings_s.get(stage, 0.0) + dt, 4)
        return dt


def list_devices() -> list[dict[str, Any]]:
    """CPU plus every CUDA device by name and memory."""
    import torch

    out: list[dict[str, Any]] = [{"id": "cpu", "name": "CPU"}]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            out.append({"id": f"cuda:{i}", "name": p.name, "memory_gb": round(p.total_memory / 2**30, 1)})
    return out


def select_device(name: str = "auto") -> "torch.device":  # noqa: F821
    """``auto`` → CUDA when present, else CPU; or an explicit ``cpu`` / ``cuda:N``."""
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"Unknown device '{name}'. Use auto, cpu or cuda:N.") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"Device '{name}' was asked for but CUDA is not available here. Use --device cpu.")
        if (dev.index or 0) >= torch.cuda.device_count():
            raise InputError(f"Device '{name}' does not exist; this machine has {torch.cuda.device_count()} GPU(s).")
    elif dev.type != "cpu":
        raise InputError(f"Unsupported device '{name}'. Use auto, cpu or cuda:N.")
    return dev


_BF16_OK: dict[str, bool] = {}


def bf16_conv3d_ok(device: "torch.device") -> bool:  # noqa: F821
    """Parity check of bf16 vs fp32 conv3d on this device (PyTorch 2.9.0 + some cuDNN got it wrong).

    bf16 autocast is used on a GPU only when this passes; never on CPU.
    """
    import torch

    if device.type != "cuda":
        return False
    key = str(device)
    if key not in _BF16_OK:
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(2, 32, 16, 16, 16, generator=g).to(device)
        w = torch.randn(32, 32, 3, 3, 3, generator=g).to(device) / 16
        ref = torch.nn.functional.conv3d(x, w, padding=1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = torch.nn.functional.conv3d(x, w, padding=1).float()
        rel = float((out - ref).norm() / ref.norm())
        _BF16_OK[key] = rel < 2e-2
    return _BF16_OK[key]


def _autocast(device: "torch.device", precision: str):  # noqa: F821
    import torch

    if precision == "fp32" or device.type != "cuda":
        return nullcontext()
    if precision in ("auto", "bf16") and bf16_conv3d_ok(device):
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


@dataclass
class GeneratedSeries:
    """Result of :func:`generate_series`: one volume per prompt, all from one noise."""

    prompts: list[str]
    volumes: list[Volume]
    seed: int
    steps: int
    guidance: float
    timings_s: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    share: float = 0.0
    separation: float = 0.0

    def model_units(self) -> np.ndarray:
        """The members as (P, *grid) float32 in model units (the inverse of :func:`model_to_output_intensity`)."""
        return np.stack([v.array for v in self.volumes]).astype(np.float32) / (OUTPUT_SCALE / 2.0) - 1.0


def model_to_output_intensity(x: np.ndarray) -> np.ndarray:
    """Model units (−1 = background, +1 = brain p99.5) → written units (0 … OUTPUT_SCALE)."""
    return ((x + 1.0) * (OUTPUT_SCALE / 2.0)).astype(np.float32)


def _timesteps(model: DiffusionModel, steps: int):
    from .sampling.schedules import resolution_shift_ratio, rflow_timesteps

    sched = model.spec.schedule
    shift = sched.get("shift")
    if shift is None:
        shift = resolution_shift_ratio(int(np.prod(model.diffusion_shape()[2:])), int(sched.get("base_numel", 32**3)))
    return rflow_timesteps(steps, shift=float(shift))


def series_separation(schedule: dict[str, Any], prompts: Sequence[str]) -> float:
    """A model's separation (:func:`generate_series`) for a series of these prompts, when none is asked for.

    ``schedule.default_separation_lesion_load`` for a lesion-load series (every prompt names a lesion
    load and none a diagnosis) of a model that has one, else ``schedule.default_separation`` (0 when the
    model has none). The two series are separate samplings, and the scale that separates lesion loads
    best costs the CN / MCI / AD series (``Training/EXPERIMENTS.md``, A separation for each series?).
    """
    from .text.prompts import classify_prompt

    general = float(schedule.get("default_separation", 0.0))
    lesion = schedule.get("default_separation_lesion_load")
    if lesion is None or not prompts:
        return general
    classes = [classify_prompt(str(p)) for p in prompts]
    if all(c["lesion_load"] is not None and c["diagnosis"] is None for c in classes):
        return float(lesion)
    return general


def generate_series(
    model: DiffusionModel,
    text_encoder: Any,
    prompts: Sequence[str],
    *,
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    share: float | None = None,
    separation: float | None = None,
    device: str = "auto",
    precision: str = "auto",
    on_event: EventCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> GeneratedSeries:
    """A counterfactual series: every prompt starts from the same seeded noise.

    Imagining Alternatives (Mohamed et al. 2025): one initial noise, several prompts →
    the same synthetic subject in different disease states. The noise is drawn on the
    CPU from ``seed`` so a series is reproducible for a given seed and device.

    Sharing only the noise lets the members' anatomy drift apart. With ``share`` > 0 the
    series also shares the first ``round(share · steps)`` sampler steps. Those are the
    high-noise steps that lay out the coarse anatomy, and they run as ONE trajectory
    conditioned on the mean of the series' prompt embeddings. After them every prompt
    continues on its own, which is where lesions and atrophy form. For a one-prompt
    series sharing changes nothing.

    With ``separation`` = a > 0 every member is, after the branch, also guided away from the
    member before it in the series (the first member away from the second):
    ``v_i = v_null + s·(v_i − v_null) + a·(v_i − v_{i−1})``. That exaggerates each step of the
    series in its own direction (none → minimal → moderate → high, CN → MCI → AD) and costs a
    third network pass per step. Guiding away from the series' mean prompt instead pulled an
    interior member such as "minimal" towards the low end (probe seeds 200–239: minimal read
    correctly 65 % with the mean, 85 % with the previous member). For a one-prompt series the
    term does not exist and is skipped.

    Args:
        model: a loaded model.
        text_encoder: the model's text encoder (checked against the spec).
        prompts: one or more sentences.
        seed: random seed of the shared noise.
        steps: sampler steps (default: the model's).
        guidance: classifier-free guidance scale s (v = v_null + s·(v_cond − v_null)); 1 = none.
        share: fraction of the steps the series shares before it branches, in [0, 1): 0 shares
            only the noise. The default is the model's ``schedule.default_share``, or 0 when it has none.
        separation: a in [0, 20] (see above); default the model's for this series
            (:func:`series_separation`).
        device: ``auto``, ``cpu`` or ``cuda:N``.
        precision: ``auto`` (bf16 on GPU if the parity check passes), ``fp32`` or ``bf16``.
        on_event: progress/log callback.
        should_cancel: polled between steps.

    Returns:
        A :class:`GeneratedSeries` with one Volume per prompt in the model's real
        geometry (the model grid in template/MNI world coordinates).
    """
    import torch

    from .sampling.samplers import guided, sample_rflow

    prompts = [str(p).strip() for p in prompts]
    if not prompts or any(not p for p in prompts):
        raise InputError("Give at least one non-empty prompt.")
    if model.spec.schedule.get("kind") != "rflow":
        raise InputError("This version samples rectified-flow models only; the model uses "
                         f"'{model.spec.schedule.get('kind')}'.")
    check_text_encoder(model.spec, text_encoder)
    steps = int(model.spec.schedule.get("default_steps", 30) if steps is None else steps)
    guidance = float(model.spec.schedule.get("default_guidance", 1.0) if guidance is None else guidance)
    if steps < 1 or steps > 1000:
        raise InputError(f"steps must be between 1 and 1000; got {steps}.")
    if not (0.0 <= guidance <= 20.0):
        raise InputError(f"guidance must be between 0 and 20; got {guidance}.")
    share = float(model.spec.schedule.get("default_share", 0.0) if share is None else share)
    if not (0.0 <= share < 1.0):
        raise InputError(f"share must be at least 0 and below 1 (a fraction of the sampler steps); got {share}.")
    separation = series_separation(model.spec.schedule, prompts) if separation is None else float(separation)
    if not (0.0 <= separation <= 20.0):
        raise InputError(f"separation must be between 0 and 20; got {separation}.")

    rep = Reporter(on_event, should_cancel)
    dev = select_device(device)
    model.to(dev)
    n = len(prompts)

    rep.start("encode_text")
    emb = text_encoder.encode(prompts)
    cond = emb.tokens.to(dev)
    null = text_encoder.null(1).tokens.to(dev)
    rep.end("encode_text")

    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    noise = torch.randn(model.diffusion_shape(1), generator=gen, dtype=torch.float32)
    x = noise.to(dev)  # one noise shared by the series

    ts = _timesteps(model, steps)
    k = min(int(round(share * steps)), steps - 1) if n > 1 else 0  # shared steps (the last one never is)

    mean = cond.mean(0, keepdim=True)
    away = separation if n > 1 else 0.0
    # member i is guided away from member i−1 (the first from the second): each step of the series is
    # exaggerated in its own direction, so an interior member (minimal) is not pulled towards an end
    away_ctx = torch.cat([cond[1:2], cond[:-1]]) if n > 1 else None

    def model_fn_of(ctx, away_scale=0.0):
        fn = guided(model.denoiser, ctx, null, guidance, away_context=away_ctx if away_scale else None,
                    away_scale=away_scale)

        def model_fn(xx, tt):
            with _autocast(dev, precision):
                return fn(xx, tt).float()

        return model_fn

    rep.start("sample", steps)
    with torch.inference_mode():
        if k:  # one trajectory under the series' mean prompt
            x = sample_rflow(model_fn_of(mean), x, ts[: k + 1],
                             callback=lambda i, tot: rep.step("sample", i, steps), should_cancel=should_cancel)
        x = x.expand(n, *x.shape[1:]).contiguous()
        z0 = sample_rflow(model_fn_of(cond, away), x, ts[k:], callback=lambda i, tot: rep.step("sample", k + i, steps),
                          should_cancel=should_cancel)
    rep.end("sample")

    rep.start("decode")
    with torch.inference_mode():
        img = model.decode(z0).float().cpu().numpy()
    rep.end("decode")

    affine = model.spec.grid.affine_ras
    vols = [Volume(model_to_output_intensity(img[i, 0]), affine) for i in range(n)]
    return GeneratedSeries(prompts, vols, int(seed), steps, guidance, dict(rep.timings_s), str(dev), share, away)


# =====================================================================================
# editing a real scan
# =====================================================================================
@dataclass
class EditResult:
    """Result of :func:`edit_scan`; every array is on the scan's own grid."""

    counterfactual: Volume
    difference: Volume
    change_labels: Volume
    report: dict[str, Any]
    model_space: dict[str, np.ndarray] = field(default_factory=dict)


#: Registration QC (default of ``min_registration_correlation``): correlation inside the template brain
#: after registration. Measured on the bundled clinical FLAIR (0.72×0.72×3 mm, with skull) against the
#: 5 mm synthetic FLAIR template: 0.41 when aligned (the same transform, within 0.3 mm, as against a
#: 2.5 mm template), 0.12 with a 10 mm shift, 0.19 with a 20° rotation, ≈ 0 for noise. Real-vs-synthetic
#: FLAIR is not a linear intensity relation, so an aligned real scan stays well below 1.
#: ``Testing/test_bundled.py::test_registration_threshold_separates_aligned_from_misaligned`` recomputes these.
MIN_REGISTRATION_CORRELATION = 0.3

#: Said (log at level "warning", and in the report's ``warnings``) when lesion filling has neither a lesion
#: mask nor the oracle's segmentation and falls back on the inversion path. That path regenerates the white
#: matter and 5 mm around it (the whole brain with ``edit_region="brain"``) from the text and does not
#: localise lesions: `counterfactualgen evaluate` measures it as
#: "fill_text_only" (bundled model: PSNR 35.4 dB against the exact lesion-free twin, unedited 36.2 dB; read as
#: lesion-free in 17 % of the subjects; README numbers).
TEXT_ONLY_FILL_WARNING = (
    "Lesion filling without a lesion mask and without the oracle: the white matter and its surroundings are "
    "regenerated from the text alone, which does not find the lesions and changes healthy tissue too (for the bundled model, further from "
    "the lesion-free truth than the unedited scan; see the README's numbers). Give a lesion mask (--lesion-mask, or "
    "a segmentation in Slicer), or let the oracle find the lesions (--oracle auto)."
)

#: Said when lesion filling without a lesion mask fills the oracle's segmentation of a scan whose voxels are
#: less than half the model voxel's volume: the segmentation is made on the model grid, so lesions smaller
#: than about one model voxel are not in it and stay. On 6 held-out engine subjects made at 1 × 1 × 3 mm
#: (``Testing/Benchmarks/bench_fine_filling.py --subjects 6 --seed 0``) the mean absolute error on the
#: lesion voxels against the exact lesion-free twin went from 0.34 (unedited) to 0.24 only (0.05 with the
#: true lesion mask): about 70 % of the lesions' contrast remained.
FINE_ORACLE_FILL_WARNING = (
    "Lesion filling without a lesion mask on a scan finer than the model ({scan} mm voxels, model {model:g} mm): "
    "the oracle's segmentation is made on the model grid and misses lesions smaller than about one model voxel, so "
    "many small lesions stay (on 1 × 1 × 3 mm test subjects about 70 % of the lesions' contrast remained). Give a "
    "lesion mask (--lesion-mask, or a segmentation in Slicer) to fill exactly the lesions' voxels."
)

#: Minimum |change| (model units, i.e. fraction of the brain's intensity range × 2) that counts as an edit;
#: anything smaller is numerical noise and the voxel keeps its original value bit for bit.
CHANGE_EPS = 0.02
#: With ``edit_region="prompt"`` a lesion-load prompt edit acts only where the two prompts' clean predictions
#: differ by at least this fraction of their largest difference in the brain (DiffEdit's mask).
EDIT_REGION_THRESHOLD = 0.5
#: DiffEdit's probe noise level and number of noisings averaged.
EDIT_REGION_T, EDIT_REGION_DRAWS = 0.5, 8
#: By default (``edit_region="auto"``) a lesion-load prompt edit of a FLAIR scan without a lesion mask
#: acts where MS lesions lie: the template's white matter (probability ≥ this) and
#: :data:`LESION_EDIT_WM_MARGIN_MM` around it (:func:`white_matter_region`). On 12 held-out engine
#: subjects (``Testing/Benchmarks/bench_edit_region.py --seed 200 --subjects 12``) that region holds
#: 98.8 % of the true lesion volume (the white matter alone 81.2 %) in 1268 of the 5 mm template brain
#: mask's 1810 ml; against the exact twins it raised lesion addition from 28.09 to 30.24 dB and filling
#: by the text alone from 28.29 to 30.64 dB (unedited 35.76 dB), with additions reaching the prompt's
#: class in 4 of 12 (whole brain 3) and the same Dice of removed voxels.
LESION_EDIT_WM_PROBABILITY = 0.5
#: How far around the template's white matter a lesion-load prompt edit may act (juxtacortical and
#: periventricular lesions border it).
LESION_EDIT_WM_MARGIN_MM = 5.0
#: Edit regions ``edit_scan`` accepts.
EDIT_REGIONS = ("auto", "brain", "prompt")
#: Change directions ``edit_scan`` accepts: ``"auto"`` keeps only the change in the direction the prompts'
#: difference moves intensities (:func:`change_direction`: more lesion load brightens a FLAIR scan, more
#: atrophy darkens it), ``"any"`` keeps every change. On held-out engine subjects (``Testing/Benchmarks/
#: bench_edit_region.py``, its README) keeping the direction raised lesion addition against the exact twin
#: from 30.77 to 33.01 dB and from 30.24 to 32.51 dB (subjects from seeds 236 and 200), filling by the text
#: alone from 31.37 to 34.10 dB and from 30.64 to 33.69 dB, with as many additions reaching their class
#: (7 and 4 of 12); for diagnosis edits it is adopted together with :data:`EDIT_STRENGTHS`.
EDIT_DIRECTIONS = ("auto", "any")
#: Default inversion strength of a prompt edit, by the scale its target names. A diagnosis edit moves the
#: cortex and ventricles of the whole brain and at 0.6 mostly stopped at MCI. At 0.8 with only the change in
#: the prompts' direction kept, CN → AD edits were read as AD in 17 and 16 of 24 held-out engine subjects
#: (10 and 9 at 0.6 keeping every change) and came nearer the exact AD twin (18.60 → 19.26 dB, 18.88 →
#: 19.66 dB); CN → MCI edits were read as MCI in 24 of 24 both times (19, 21) and never as AD
#: (``bench_edit_region.py --tasks atrophy mci``, seeds 260 and 284). Edits *down* the diagnosis scale
#: (``"diagnosis_down"``: towards CN, the source prompt naming a later class than the target) came nearer
#: the exact CN twin at 0.6: AD → CN 20.72 → 21.21 dB and 20.56 → 21.12 dB, read as CN in 24 of 24 either
#: way (``bench_edit_region.py --tasks cn --strengths 0.8 0.6``, seeds 380 and 404). Stronger inversions
#: bought lesion-load edits nothing once their direction was kept (8 / 8 / 7 of 12 reaching the class at
#: 0.6 / 0.7 / 0.8). A target on both scales, or on neither, uses :data:`DEFAULT_EDIT_STRENGTH`.
EDIT_STRENGTHS = {"lesion_load": 0.6, "diagnosis": 0.8, "diagnosis_down": 0.6}
DEFAULT_EDIT_STRENGTH = 0.6


def edit_strength(target_prompt: str, source_prompt: str | None = None) -> float:
    """The default inversion strength of a prompt edit from ``source_prompt`` to ``target_prompt``
    (:data:`EDIT_STRENGTHS`): by the one scale the target names, and for a diagnosis edit by its way along
    the scale (a source naming a later class than the target: ``"diagnosis_down"``)."""
    from .text.prompts import classify_prompt

    c = classify_prompt(target_prompt)
    named = [k for k in ("lesion_load", "diagnosis") if c.get(k) is not None]
    if len(named) != 1:
        return DEFAULT_EDIT_STRENGTH
    if named[0] == "diagnosis" and source_prompt is not None:
        src = classify_prompt(source_prompt).get("diagnosis")
        order = _SCALES["diagnosis"]
        if src is not None and order.index(src) > order.index(c["diagnosis"]):
            return EDIT_STRENGTHS["diagnosis_down"]
    return EDIT_STRENGTHS[named[0]]


#: Ordered classes of the two prompt scales, and the sign (+1 brighter, −1 darker) a step up each scale
#: gives, by contrast: MS lesions are hyperintense on FLAIR and hypo- or isointense on T1; atrophy replaces
#: tissue by CSF, dark on both. Measured on FLAIR only (the benchmark above); no T1 model is bundled.
_SCALES = {"lesion_load": ("none", "minimal", "moderate", "high"), "diagnosis": ("CN", "MCI", "AD")}
_SCALE_SIGN = {"FLAIR": {"lesion_load": 1, "diagnosis": -1}, "T1": {"lesion_load": -1, "diagnosis": -1}}


def change_direction(source_prompt: str, target_prompt: str, contrast: str,
                     scales: Sequence[str] = ("lesion_load", "diagnosis")) -> tuple[int, str]:
    """The sign of intensity change an edit from ``source_prompt`` to ``target_prompt`` should make.

    For every scale the target names (lesion load none < minimal < moderate < high; diagnosis
    CN < MCI < AD) and the source names differently, a step up moves intensities one way in
    ``contrast`` (lesions brighter on FLAIR and darker on T1, atrophy darker on both). When every
    such move agrees the edit should only brighten (+1) or only darken (−1). It is 0 (no rule) when
    nothing moves, the moves disagree, the source does not name a scale the target names, the target
    names a scale outside ``scales`` (its move is not ruled on, so nothing is), or the contrast is
    neither FLAIR nor T1.

    Returns:
        ``(sign, reason)``: +1, −1 or 0, and a sentence saying why.
    """
    from .text.prompts import classify_prompt

    signs = _SCALE_SIGN.get(str(contrast).upper())
    if signs is None:
        return 0, f"no direction rule for {contrast} scans"
    src, tgt = classify_prompt(source_prompt), classify_prompt(target_prompt)
    moves = []
    for scale, order in _SCALES.items():
        if tgt.get(scale) is None:
            continue
        if scale not in scales:
            return 0, f"no direction rule for {scale.replace('_', ' ')} edits"
        if src.get(scale) is None:
            return 0, f"the source prompt names no {scale.replace('_', ' ')}"
        step = order.index(tgt[scale]) - order.index(src[scale])
        if step:
            moves.append((scale, signs[scale] * (1 if step > 0 else -1), f"{src[scale]} → {tgt[scale]}"))
    if not moves:
        return 0, "the prompts name the same classes"
    if len({m[1] for m in moves}) > 1:
        return 0, "the prompts' changes move intensities both ways"
    sign = moves[0][1]
    what = ", ".join(f"{m[0].replace('_', ' ')} {m[2]}" for m in moves)
    return sign, f"{what} on {str(contrast).upper()} {'brightens' if sign > 0 else 'darkens'}"


#: |change| in model units above which a FLAIR brightening/darkening inside a filled lesion region
#: (lesion filling by inpainting) is called a lesion added/removed.
LESION_DELTA = 0.12
#: With an oracle, a prompt edit (the inversion path) labels a voxel "lesion added" when it brightens
#: by at least this much *and* the oracle segments it as lesion after the edit (probability ≥
#: :data:`AUTO_MASK_PROBABILITY`), "lesion removed" when it darkens by this much where the oracle
#: segmented a lesion before. By |change| alone (≥ :data:`LESION_DELTA`) a prompt edit's labelmap
#: counted every brightened voxel: on 6 held-out engine subjects (seeds 200–205) text-only filling
#: marked 39–312 ml "removed" for 11–29 ml of true lesions (Dice 0.08–0.18), addition 39–306 ml
#: "added" where the oracle read +2–51 ml. Gated by the oracle at this threshold: removed 11–26 ml
#: (Dice 0.61–0.88), added 1–40 ml; thresholds 0.08 / 0.12 under-counted (Dice 0.50–0.81 /
#: 0.30–0.78). ``Testing/Benchmarks/bench_change_labels.py`` recomputes these.
#: Without an oracle a prompt edit labels no lesions (every change is 3) and reports no lesion ml:
#: no rule on the image alone was reliable. Gating |change| ≥ 0.08 by FLAIR hyperintensity (≥ 1.1×
#: the scan's white-matter median, in or next to white matter) raised the Dice above from 0.13 to
#: 0.45 but still labelled 153 ml "removed" for one subject's 20 ml of lesions (same benchmark,
#: ``--ratios``).
ORACLE_LESION_DELTA = 0.04
#: Lesion filling without a mask fills the oracle's segmentation: voxels of at least this lesion
#: probability (:func:`oracle_lesion_region`).
AUTO_MASK_PROBABILITY = 0.5


def _psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray, data_range: float = 2.0) -> float:
    mse = float(np.mean((a[mask] - b[mask]) ** 2)) if mask.any() else 0.0
    return float("inf") if mse == 0 else float(10 * np.log10(data_range**2 / mse))


#: The model-unit range an edit reads a scan in (background −1, the brain's upper percentile 1; lesions above it).
MODEL_INPUT_RANGE = (-1.0, 1.5)


@dataclass
class ModelSpaceScan:
    """A scan brought into a model's space by :func:`to_model_space`."""

    mapping: Any  # geometry.ModelSpaceMapping
    brain_mask: np.ndarray  # bool, on the scan's grid
    norm: Any  # intensity.IntensityNormalizer
    x_model: np.ndarray  # the scan on the model grid, in model units
    brain_model: np.ndarray  # bool, the brain on the model grid
    correlation: float | None  # registration QC (None without registration)


def to_model_space(scan: Volume, grid: Any, template: Volume | None, template_brain: np.ndarray | None, *,
                   brain_mask: np.ndarray | None = None, registration: str = "affine", contrast: str = "",
                   upper_percentile: float = 99.5, min_correlation: float = MIN_REGISTRATION_CORRELATION,
                   transform: np.ndarray | None = None, outside_brain: str = "scan") -> ModelSpaceScan:
    """A scan in a model's space: affine registration to the model's template (or none), the brain
    mask (``brain_mask``, else the template's brain carried back, else an estimate), the scan resampled
    onto the model grid and its intensities normalised (background −1, brain p``upper_percentile`` +1).

    One function for both sides of a model: :func:`edit_scan` brings the scan to edit here, and
    ``Training/train_diffusion.py`` brings each scan of a manifest here, so a model trained on your
    scans sees them exactly as its edits will.

    ``transform`` (model world → scan world, from an earlier registration of this scan) is used
    instead of registering again. ``outside_brain`` (the model's spec ``intensity.outside_brain``):
    ``"scan"`` shows the model the scan's own voxels outside the brain mask, ``"flat"`` sets them to −1.

    Raises:
        InputError: the registration's correlation inside the template brain is below
            ``min_correlation`` (not a brain MRI of that contrast?), or the brain mask is empty.
    """
    from .geometry import ModelSpaceMapping, estimate_brain_mask, register_affine
    from .intensity import IntensityNormalizer

    score = None
    if transform is not None:
        mapping = ModelSpaceMapping(grid, scan.shape, scan.affine_ras, np.asarray(transform, np.float64))
    elif registration == "affine":
        if template is None:
            raise InputError("Registration needs the model's template image.")
        reg = register_affine(scan, template, template_mask=template_brain)
        score = float(reg.correlation)
        if score < min_correlation:
            raise InputError(
                f"Registration to the model's template failed (correlation {score:.2f} < {min_correlation}). "
                f"Check the scan is a brain MRI in the model's contrast ({contrast}), or pass a brain mask.")
        mapping = ModelSpaceMapping(grid, scan.shape, scan.affine_ras, reg.model_to_source_world)
    elif registration == "none":
        mapping = ModelSpaceMapping(grid, scan.shape, scan.affine_ras, np.eye(4))
    else:
        raise InputError(f"Unknown registration '{registration}'; use affine or none.")
    if brain_mask is None:
        if template_brain is not None:
            # linear, then ≥ 0.5: the template's 5 mm voxels would leave a blocky edge on a fine scan, and
            # an edit's change stops at this mask
            brain_mask = mapping.to_source(np.asarray(template_brain, np.float32), interpolation="linear") >= 0.5
        else:
            brain_mask = estimate_brain_mask(scan)
    brain_mask = np.asarray(brain_mask) > 0
    if brain_mask.sum() < 100:
        raise InputError("The brain mask on the scan has almost no voxels; registration or the mask is wrong.")
    norm = IntensityNormalizer.fit(scan.array, brain_mask, upper_percentile=float(upper_percentile))
    x_model = norm.forward(mapping.to_model(scan, default=norm.low))
    brain_model = mapping.to_model(brain_mask.astype(np.float32), interpolation="nearest") > 0.5
    if outside_brain == "flat":
        x_model = np.where(brain_model, x_model, np.float32(norm.out_low)).astype(np.float32)
    elif outside_brain != "scan":
        raise InputError(f"Unknown outside_brain '{outside_brain}'; use scan or flat.")
    return ModelSpaceScan(mapping, brain_mask, norm, x_model, brain_model, score)


def edit_scan(
    model: DiffusionModel,
    text_encoder: Any,
    scan: Volume,
    *,
    target_prompt: str,
    source_prompt: str | None = None,
    brain_mask: np.ndarray | None = None,
    lesion_mask: np.ndarray | None = None,
    strength: float | None = None,
    steps: int | None = None,
    guidance: float | None = None,
    seed: int = 0,
    registration: str = "affine",
    attention_keep: float = 0.8,
    edit_word_weight: float = 1.0,
    min_registration_correlation: float = MIN_REGISTRATION_CORRELATION,
    oracle: Any | None = None,
    null_text_iterations: int = 0,
    fill_samples: int = 4,
    auto_lesion_mask: bool = True,
    edit_region: str = "auto",
    edit_region_threshold: float | None = None,
    separation: float = 0.0,
    direction: str = "auto",
    scan_name: str | None = None,
    device: str = "auto",
    precision: str = "auto",
    on_event: EventCallback | None = None,
    should_cancel: Callable[[], bool] | None = None,
) -> EditResult:
    """Counterfactual of a real scan in its own geometry (PRISM stage 3 + RadEdit, in 3D).

    1. Normalise: affine registration to the model's template (or none), brain mask
       (user's, else the template's carried back), resample to the model grid, robust
       intensity normalisation.
    2. Invert the scan under the source prompt with the rectified-flow ODE up to
       ``t = strength`` (SDEdit-style partial inversion). With
       ``null_text_iterations > 0`` and guidance ≠ 0, 1: null-text optimisation
       (PRISM; :func:`~.sampling.editing.optimise_null_text`) fits one null embedding
       per step so that the guided source branch retraces the inversion, and both
       branches then sample with those embeddings.
    3. Regenerate in ONE batch under the source prompt (the reconstruction) and the
       target prompt (the counterfactual), with guidance, while the target's
       cross-attention copies the source's maps for shared words during the first
       ``attention_keep`` of the steps (prompt-to-prompt).
    4. change = counterfactual − reconstruction (model space; the inversion error
       cancels), restricted to the edit region (brain; a given lesion mask for lesion
       removal) and zeroed below :data:`CHANGE_EPS`.
    5. Map only the change back to the scan's grid and add it to the original
       intensities: voxels the edit did not touch keep their values bit for bit.
       Lesion filling with a lesion mask instead writes the fill into the mask's own voxels,
       without a seam (:func:`seamless_fill_change`); nothing else changes.

    Lesion filling with a lesion mask (target "no lesions" + ``lesion_mask``) takes
    another path in steps 2–3: the voxels the mask touches on the model grid are
    regenerated from noise by masked inpainting under the target prompt
    (:func:`~.sampling.samplers.inpaint_rflow`) and everything else is kept. The fill is
    the mean of ``fill_samples`` inpaintings from different noises: an estimate of the
    posterior mean, which is what minimises the squared error to the true lesion-free
    tissue (classical lesion filling also writes a mean NAWM-like value, not one noisy
    draw). On 2 held-out engine subjects with the demo model, 1 / 2 / 4 / 8 samples gave
    PSNR vs the exact twin of 45.2 / 47.1 / 47.8 / 48.5 dB (moderate load; unedited
    39.6 dB) and 38.9 / 40.1 / 40.5 / 40.0 dB (high; unedited 32.7 dB)
    (``Testing/Benchmarks/bench_lesion_filling.py``). ``strength``, attention control and null-text
    optimisation do not apply; the report says ``"method": "inpainting"``.

    Lesion filling without a mask, with an ``oracle`` and ``auto_lesion_mask`` (the default),
    fills the oracle's lesion segmentation the same way (:func:`oracle_lesion_region`; the
    report says ``"lesion_mask": "oracle"``; an empty segmentation leaves the scan unchanged).
    By the text alone (the inversion path) filling rewrites healthy tissue too: on 6 held-out
    engine subjects it scored PSNR 35.4 dB against the exact lesion-free twin (32.4 dB keeping every
    change, 29.0 dB on the whole brain), below the unedited scan's 36.2 dB; ``counterfactualgen evaluate``
    measures both.

    By default (``edit_region="auto"``) a lesion-load prompt edit of a FLAIR scan on the inversion path
    keeps its change in the template's white matter and :data:`LESION_EDIT_WM_MARGIN_MM` around it
    (:func:`white_matter_region`), where MS lesions lie; every other edit acts on the whole brain, and
    ``edit_region="brain"`` makes a lesion-load edit do so too (a model that ships no white-matter
    template always does). ``edit_region="prompt"`` confines a lesion-load prompt edit on the inversion path to where
    the source and target prompts disagree (DiffEdit, Couairon et al. 2023:
    :func:`~.sampling.editing.prompt_change_map` on ``EDIT_REGION_DRAWS`` noisings at
    ``t = EDIT_REGION_T``, kept where it reaches ``edit_region_threshold`` of its largest value in
    the brain): after every sampler step the target row is reset to the source row outside the
    region, so nothing outside it changes. On 6 held-out engine subjects
    (``Testing/Benchmarks/bench_edit_region.py``) it cut the change to healthy tissue about five-fold
    but fewer additions reached the prompt's class, so it is not the default.

    ``separation`` = a > 0 also guides the target row of a prompt edit (the inversion path) away from
    the source prompt, ``v_target = v_null + s·(v_target − v_null) + a·(v_target − v_source)``, as a
    series guides each member away from the one before it (the source row is unchanged). It makes edits
    stronger and costs the healthy tissue more: on 12 held-out engine subjects (224–235,
    ``Testing/Benchmarks/bench_edit_region.py --separations 0 1.5 3``) a = 1.5 made every addition reach
    its class (8 of 12 at 0) and every CN → AD edit read as AD (3 of 12) at 2.1 dB lower addition PSNR
    against the twin and 0.8 dB lower CN → AD PSNR, so it is 0 by default.

    ``strength`` ``None`` (the default) is the default of the target's scale (:func:`edit_strength`: 0.6 for
    lesion load, 0.8 for diagnosis towards AD, 0.6 towards CN; :data:`EDIT_STRENGTHS` has the measurements),
    chosen once the source prompt is known (given, or the oracle's reading); the report records the strength
    used.

    ``direction="auto"`` (the default) keeps only the part of a prompt edit's change (the inversion path)
    that moves intensities the way the prompts' difference does (:func:`change_direction`: adding lesions
    brightens a FLAIR scan, removing them darkens it; more atrophy darkens); the opposite part is regenerated
    healthy tissue (:data:`EDIT_DIRECTIONS` has the measurements). ``"any"``, and every edit the rule does not
    cover, keeps all of the change. The report's ``direction`` says which sign was kept and how much change
    (ml on the model grid, and its share of the change's energy) the rule removed.

    ``scan_name`` (the file or Slicer node name) is checked for the name of another contrast than the
    model's (:func:`contrast_name_warning`): the report then warns that the edit is not meaningful.

    With an ``oracle`` (:class:`~CounterfactualGenLib.evaluation.oracle.Oracle`), the
    report carries its lesion volume and diagnosis of the scan before and after the edit
    (read in model space, brain only; "after" reads the counterfactual as written, resampled
    as the scan was), and a missing source prompt is the oracle's reading
    of the scan ("Subject has moderate lesion load." for 9 ml) instead of a guess.

    Returns:
        :class:`EditResult`: counterfactual, signed difference (scan units), change
        labels (1 lesion added, 2 lesion removed, 3 other change; :func:`change_labels`)
        and a report.
    """
    import torch

    from .nets.attention import AttentionControl
    from .sampling.editing import (InjectSourceAttention, align_tokens, optimise_null_text, partial_grid,
                                   prompt_change_map, region_from_change_map)
    from .sampling.samplers import guided, inpaint_rflow, invert_rflow, sample_rflow
    from .text.prompts import classify_prompt, unrecognised_prompt_warning
    from .volume import validate_volume

    validate_volume(scan, name="input scan")
    target_prompt = str(target_prompt).strip()
    if not target_prompt:
        raise InputError("Give a target prompt (--to).")
    if model.spec.schedule.get("kind") != "rflow":
        raise InputError("Editing needs a rectified-flow model.")
    check_text_encoder(model.spec, text_encoder)
    steps = int(model.spec.schedule.get("default_steps", 30) if steps is None else steps)
    guidance = float(model.spec.schedule.get("default_guidance", 1.0) if guidance is None else guidance)
    if strength is not None and not 0.0 < float(strength) <= 1.0:
        raise InputError(f"strength must be in (0, 1]; got {float(strength):g}.")
    if not 1 <= steps <= 1000:
        raise InputError(f"steps must be between 1 and 1000; got {steps}.")
    if not 0.0 <= guidance <= 20.0:
        raise InputError(f"guidance must be between 0 and 20; got {guidance}.")
    if not 1 <= int(fill_samples) <= 32:
        raise InputError(f"fill_samples must be between 1 and 32; got {fill_samples}.")
    if not 0 <= int(null_text_iterations) <= 100:
        raise InputError(f"null-text iterations must be between 0 and 100 per step; got {null_text_iterations}.")
    if not 0.0 <= float(separation) <= 20.0:
        raise InputError(f"separation must be between 0 and 20; got {separation}.")
    if direction not in EDIT_DIRECTIONS:
        raise InputError(f"Unknown direction '{direction}'; use {' or '.join(EDIT_DIRECTIONS)}.")
    if edit_region not in EDIT_REGIONS:
        raise InputError(f"Unknown edit region '{edit_region}'; use {', '.join(EDIT_REGIONS[:-1])} or {EDIT_REGIONS[-1]}.")
    thr = EDIT_REGION_THRESHOLD if edit_region_threshold is None else float(edit_region_threshold)
    if not 0.0 < thr < 1.0:
        raise InputError(f"The edit-region threshold must be in (0, 1); got {thr}.")
    for name, m in (("brain mask", brain_mask), ("lesion mask", lesion_mask)):
        if m is not None and tuple(m.shape) != scan.shape:
            raise InputError(f"The {name} has shape {tuple(m.shape)} but the scan has {scan.shape}; "
                             "they must be on the same grid.")
    rep = Reporter(on_event, should_cancel)
    dev = select_device(device)
    model.to(dev)
    grid = model.spec.grid

    # -- 1. spatial + intensity normalisation ------------------------------------------
    rep.start("register")
    has_template_mask = bool(model.spec.template.get("brain_mask")) and model.path is not None
    ms = to_model_space(scan, grid, model.template("image") if registration == "affine" else None,
                        model.template("brain_mask").array > 0.5 if has_template_mask else None,
                        brain_mask=brain_mask, registration=registration, contrast=model.spec.contrast,
                        upper_percentile=float(model.spec.intensity.get("upper_percentile", 99.5)),
                        min_correlation=min_registration_correlation,
                        outside_brain=str(model.spec.intensity.get("outside_brain", "scan")))
    mapping, brain_mask, norm, x_model, brain_model, score = (ms.mapping, ms.brain_mask, ms.norm, ms.x_model,
                                                              ms.brain_model, ms.correlation)
    if score is not None:
        rep.log(f"Registered to the model template: correlation {score:.3f} inside the template brain.")
    rep.end("register")

    # -- oracle reading of the scan (brain only, model space) ------------------------------
    target_class = classify_prompt(target_prompt)
    before = None
    if oracle is not None:
        rep.start("oracle")
        before = _oracle_reading(oracle, np.where(brain_model, x_model, -1.0), grid)
        rep.end("oracle")
        rep.log(f"Oracle '{oracle.id}' reads the scan as {before['lesion_ml']:.2f} ml of lesions "
                f"({before['lesion_load']}), {before['diagnosis']}.")

    filling = target_class.get("lesion_load") == "none"
    lesion_region, mask_source = None, None
    mask_warnings: list[str] = []
    if filling and lesion_mask is not None:
        lm = mapping.to_model((np.asarray(lesion_mask) > 0).astype(np.float32), interpolation="linear") > 0.01
        lesion_region, mask_source = lm & brain_model, "given"
        if not lesion_region.any():
            raise InputError("The lesion mask has no voxels inside the brain; there is nothing to fill.")
        mask_warnings = _check_lesion_mask(scan, np.asarray(lesion_mask) > 0, brain_mask, model.spec.contrast)
    elif filling and auto_lesion_mask and before is not None:
        lesion_region, mask_source = oracle_lesion_region(before["lesion_prob"], brain_model), "oracle"
        rep.log(f"Lesion filling without a lesion mask: filling the oracle's segmentation "
                f"({float(lesion_region.sum()) * grid.spacing_mm ** 3 / 1000.0:.2f} ml on the model grid, lesion probability "
                f"≥ {AUTO_MASK_PROBABILITY}). Give a lesion mask (--lesion-mask, or a segmentation in Slicer) to "
                "choose the voxels.")

    # -- 2. inversion ------------------------------------------------------------------
    source_origin = "given"
    if source_prompt is None:
        source_prompt, source_origin = _default_source_prompt(target_prompt, before)
        rep.log(f"Source prompt (not given; {source_origin}): '{source_prompt}'.")
    strength = edit_strength(target_prompt, source_prompt) if strength is None else float(strength)
    prompts = [source_prompt, target_prompt]
    rep.start("encode")
    emb = text_encoder.encode(prompts)
    cond = emb.tokens.to(dev)
    null = text_encoder.null(1).tokens.to(dev)
    x = torch.from_numpy(np.clip(x_model, *MODEL_INPUT_RANGE))[None, None].to(dev)
    with torch.inference_mode():
        z0 = model.encode(x)
    rep.end("encode")

    def fn_of(ctx, s, null_ctx=null, away=0.0):
        # away > 0: the target row (1) is also guided away from the source prompt; the source row's term is zero
        f = guided(model.denoiser, ctx, null_ctx, s, away_scale=away,
                   away_context=torch.cat([ctx[:1], ctx[:1]]) if away else None)

        def model_fn(xx, tt):
            with _autocast(dev, precision):
                return f(xx, tt).float()
        return model_fn

    # -- where a lesion-load prompt edit may act (DiffEdit): not with a given or oracle mask --
    prompt_region = None
    lesion_prompt = target_class.get("lesion_load") is not None and model.spec.contrast.upper() == "FLAIR"
    if edit_region == "prompt" and not (lesion_prompt and lesion_region is None):
        rep.log("--edit-region prompt applies to lesion-load prompt edits of FLAIR models without a lesion mask; "
                + ("this edit fills the lesion mask." if lesion_region is not None else "this edit uses the whole brain."))
    if edit_region == "prompt" and lesion_prompt and lesion_region is None:
        rep.start("edit_region")
        with torch.inference_mode():
            cmap = prompt_change_map(fn_of(cond, guidance), z0, model.decode, t=EDIT_REGION_T,
                                     draws=EDIT_REGION_DRAWS, seed=seed)
        prompt_region = region_from_change_map(cmap, brain_model, thr)
        region_ml = float(prompt_region.sum()) * grid.spacing_mm ** 3 / 1000.0
        rep.end("edit_region")
        rep.log(f"Edit region: where '{source_prompt}' and '{target_prompt}' disagree "
                f"({region_ml:.2f} ml on the model grid, "
                f"≥ {thr:g} of the largest disagreement; --edit-region brain edits the whole brain).")
    wm_region = None
    if edit_region == "auto" and lesion_prompt and lesion_region is None:
        try:
            white = model.template("white_matter").array
        except ModelError:
            rep.log(f"Model '{model.id}' ships no white-matter template: the lesion-load edit acts on the whole brain.")
        else:
            wm_region = white_matter_region(white, brain_model, grid.spacing_mm)
    inpaint = lesion_region is not None
    warnings: list[str] = []
    if wm_region is not None and not wm_region.any():
        wm_region = None
        warnings.append("The template's white matter does not overlap the scan's brain mask on the model grid, so "
                        "the lesion-load edit acts on the whole brain. Check the brain mask and the registration.")
    if filling and not inpaint:
        warnings.append(TEXT_ONLY_FILL_WARNING)
    if mask_source == "oracle" and scan.voxel_volume_ml < 0.5 * grid.spacing_mm ** 3 / 1000.0:
        warnings.append(FINE_ORACLE_FILL_WARNING.format(scan=" × ".join(f"{v:.2g}" for v in scan.spacing_mm),
                                                        model=float(grid.spacing_mm)))
    warnings += mask_warnings
    if inpaint and target_class.get("diagnosis") is not None:
        warnings.append(f"Lesion filling regenerates only the lesion voxels: the prompt's diagnosis "
                        f"({target_class['diagnosis']}) is not applied. Edit the diagnosis in a second run.")
    unknown = unrecognised_prompt_warning(target_prompt)
    if unknown is not None:
        warnings.append(unknown)
    same = None if inpaint else same_class_warning(source_prompt, target_prompt, source_origin)
    if same is not None:
        warnings.append(same)
    named = contrast_name_warning(scan_name, model.spec.contrast, model.id) if scan_name else None
    if named is not None:
        warnings.insert(0, named)
    for w in warnings:
        rep.log(w, level="warning")

    full = _timesteps(model, steps)
    grid_t = full if inpaint else partial_grid(full, strength)
    n_steps = grid_t.numel() - 1

    null_text = None
    if inpaint and not lesion_region.any():  # only an oracle's segmentation can be empty (a given mask is checked)
        rep.log("The oracle finds no lesion voxels in the scan: nothing to fill, the counterfactual equals the scan. "
                "Give a lesion mask (--lesion-mask, or a segmentation in Slicer) to fill chosen voxels.")
        with torch.inference_mode():
            pair = model.decode(z0.float()).float().cpu().numpy()[:, 0].repeat(2, axis=0)
    elif inpaint:
        rep.log("Lesion filling inside the mask: the masked lesions are regenerated from noise under the target "
                "prompt (inpainting); strength and attention control do not apply.")
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        k = int(fill_samples)
        noise = torch.randn((k, *z0.shape[1:]), generator=gen, dtype=torch.float32).to(dev)
        region = torch.from_numpy(lesion_region.astype(np.float32))[None, None].to(dev)
        m_z = torch.nn.functional.adaptive_max_pool3d(region, tuple(int(v) for v in z0.shape[2:]))
        rep.start("sample", n_steps)
        with torch.inference_mode():
            z_cf = inpaint_rflow(fn_of(cond[1:2], guidance), z0.float().expand(k, *z0.shape[1:]), m_z, noise, grid_t,
                                 callback=lambda i, n: rep.step("sample", i, n), should_cancel=should_cancel)
        rep.end("sample")
        rep.start("decode")
        with torch.inference_mode():
            # the mean of k fills (in the model's latent/wavelet space, a linear map of the image)
            pair = model.decode(torch.cat([z0.float(), z_cf.mean(0, keepdim=True)])).float().cpu().numpy()[:, 0]
        rep.end("decode")
    else:
        rep.start("invert", n_steps)
        with torch.inference_mode():
            # Inversion without guidance (PRISM/DDIM-inversion practice: s = 1 keeps the ODE faithful).
            z_t, pivots = invert_rflow(fn_of(cond[:1], 1.0), z0, grid_t, callback=lambda i, n: rep.step("invert", i, n),
                                       should_cancel=should_cancel, return_path=True)
        rep.end("invert")
        null_ctx = null
        if null_text_iterations and guidance not in (0.0, 1.0):
            rep.start("null_text", n_steps)

            def net(xx, tt, cc):
                with _autocast(dev, precision):
                    return model.denoiser(xx, tt, cc)

            null_ctx, stats = optimise_null_text(net, cond[:1], null, pivots, grid_t, guidance,
                                                 inner_steps=int(null_text_iterations),
                                                 callback=lambda i, n: rep.step("null_text", i, n),
                                                 should_cancel=should_cancel)
            with torch.inference_mode():  # what the source branch reconstructs without it (for the report)
                plain = model.decode(sample_rflow(fn_of(cond[:1], guidance), z_t, grid_t,
                                                  should_cancel=should_cancel)).float().cpu().numpy()[0, 0]
            null_text = {"iterations_per_step": int(null_text_iterations),
                         "reconstruction_psnr_db_without": round(_psnr(plain, x_model, brain_model), 3),
                         "last_step_mse_before": stats["step_mse_before"][-1],
                         "last_step_mse_after": stats["step_mse_after"][-1]}
            rep.end("null_text")
        del pivots

        # -- 3. regenerate source + target in one batch with attention control -------------
        L = cond.shape[1]
        tm = align_tokens(text_encoder.token_strings(source_prompt), text_encoder.token_strings(target_prompt), L)
        tgt_real = emb.mask[1].cpu()
        edited = tgt_real & (tm < 0)
        # guided() batches [null; cond] ([null; cond; away] with a separation), [cond] at scale 1 ([cond; away])
        # and [null] at scale 0 without a separation: the source and target rows of the prompt's branch
        rows = ([0], [1]) if guidance == 1.0 or (guidance == 0.0 and not separation) else ([2], [3])
        ctrl = InjectSourceAttention(tm, rows[0], rows[1], total_calls=n_steps, until_fraction=attention_keep,
                                     edit_weight=edit_word_weight, edited_tokens=edited)
        rep.start("sample", n_steps)
        blend = None
        if prompt_region is not None:  # DiffEdit: outside the region the target row follows the source row
            m_z = torch.nn.functional.adaptive_max_pool3d(
                torch.from_numpy(prompt_region.astype(np.float32))[None, None].to(dev),
                tuple(int(v) for v in z_t.shape[2:]))

            def blend(zz):
                return torch.cat([zz[:1], m_z * zz[1:] + (1.0 - m_z) * zz[:1]])
        with torch.inference_mode(), AttentionControl(model.denoiser, ctrl):
            z_pair = sample_rflow(fn_of(cond, guidance, null_ctx, float(separation)),
                                  z_t.expand(2, *z_t.shape[1:]).contiguous(), grid_t,
                                  callback=lambda i, n: rep.step("sample", i, n), should_cancel=should_cancel,
                                  after_step=blend)
        rep.end("sample")
        rep.start("decode")
        with torch.inference_mode():
            pair = model.decode(z_pair).float().cpu().numpy()[:, 0]
        rep.end("decode")
    recon, cf = pair[0], pair[1]

    # -- 4. change in model space, restricted to the edit region --------------------------
    region = brain_model.copy()
    if inpaint:
        region &= lesion_region
    elif wm_region is not None:
        region &= wm_region
    change = (cf - recon) * region
    change[np.abs(change) < CHANGE_EPS] = 0.0
    direction_report = None
    if direction != "any" and not inpaint:
        sign, reason = change_direction(source_prompt, target_prompt, model.spec.contrast)
        direction_report = {"kept": {1: "brightening", -1: "darkening", 0: "both"}[sign], "rule": reason}
        if sign:
            against = sign * change < 0
            energy = float((change ** 2).sum())
            direction_report.update({
                "removed_ml_model_grid": round(float(against.sum()) * grid.spacing_mm ** 3 / 1000.0, 3),
                "removed_energy_fraction": round(float((change[against] ** 2).sum()) / energy, 4) if energy else 0.0})
            change[against] = 0.0
            rep.log(f"Change direction: {reason}, so only {direction_report['kept']} is kept "
                    f"({direction_report['removed_ml_model_grid']:.2f} ml of the opposite change removed on the "
                    "model grid; --direction any keeps it).")

    # -- 5. back to the scan's grid -------------------------------------------------------
    rep.start("map_back")
    if inpaint and mask_source == "given":  # the mask is on the scan's grid: write the fill into its voxels
        change_src = seamless_fill_change(norm.forward(scan.array), mapping.to_source(cf, interpolation="linear"),
                                          (np.asarray(lesion_mask) > 0) & brain_mask, scan.spacing_mm)
    else:
        change_src = mapping.to_source(change, interpolation="linear", default=0.0)
    change_src[np.abs(change_src) < CHANGE_EPS] = 0.0
    change_src[~brain_mask] = 0.0
    delta = norm.inverse_delta(change_src)
    touched = delta != 0
    # Not above the model's range, nor below the scan's minimum; but above the scan's maximum, since added
    # lesions may be brighter than anything in the scan (clipping them there had hidden part of an
    # addition from the file while the report read the unclipped change).
    lo = float(scan.array.min())
    hi = max(float(scan.array.max()), float(norm.inverse(np.float64(MODEL_INPUT_RANGE[1]))))
    cf_arr = scan.array.copy()
    cf_arr[touched] = np.clip(scan.array[touched] + delta[touched], lo, hi)
    rep.end("map_back")
    after = None
    if oracle is not None and before is not None:
        rep.start("oracle")
        # the counterfactual as written, resampled and normalised as the scan was
        x_after = norm.forward(mapping.to_model(cf_arr, default=norm.low))
        after = _oracle_reading(oracle, np.where(brain_model, x_after, -1.0), grid)
        rep.end("oracle")
        for key, what in (("lesion_load", "lesion load"), ("diagnosis", "diagnosis")):
            if target_class.get(key) is None and before[key] != after[key]:
                w = (f"The prompt does not name a {what}, but the oracle reads it as {before[key]} before and "
                     f"{after[key]} after the edit: the edit changed more than it asked for. Check the difference "
                     "map, or name what should stay (e.g. both clauses) in --to.")
                warnings.append(w)
                rep.log(w, level="warning")
    gate = {}
    if lesion_prompt and not inpaint and after is not None:  # a prompt edit: lesions only where the oracle segments them
        gate = {f"oracle_{k}": mapping.to_source(r["lesion_prob"], interpolation="linear", default=0.0)
                for k, r in (("before", before), ("after", after))}
    labels, label_rule = change_labels(change_src, touched, lesion_prompt=lesion_prompt, inpainting=inpaint, **gate)
    lesion_ml_measured = label_rule != NO_ORACLE_RULE

    vox_ml = scan.voxel_volume_ml
    report = {
        "prompts": {"from": source_prompt, "to": target_prompt},
        "strength": strength, "steps": steps, "sampler_steps_run": n_steps, "guidance": guidance, "seed": seed,
        "attention_keep": attention_keep, "registration": registration,
        "registration_score": None if score is None else round(float(score), 4),
        "method": "inpainting" if inpaint else "inversion",
        **({"lesion_mask": mask_source} if filling else {}),
        **({"fill_samples": int(fill_samples)} if inpaint else {}),
        "reconstruction_psnr_db": None if inpaint else round(_psnr(recon, x_model, brain_model), 3),
        "null_text": null_text,
        "edit_region": ({"kind": "prompt", "rule": "DiffEdit: the source and target prompts' clean predictions differ by "
                                                  f"≥ {thr:g} of their largest difference in the brain "
                                                  f"({EDIT_REGION_DRAWS} noisings at t = {EDIT_REGION_T})",
                         "ml_model_grid": round(region_ml, 3)}
                        if prompt_region is not None else
                        {"kind": "white matter",
                         "rule": f"the template's white matter (probability ≥ {LESION_EDIT_WM_PROBABILITY:g}) and "
                                 f"{LESION_EDIT_WM_MARGIN_MM:g} mm around it, where MS lesions lie",
                         "ml_model_grid": round(float(wm_region.sum()) * grid.spacing_mm ** 3 / 1000.0, 3)}
                        if wm_region is not None else {"kind": "lesion mask" if inpaint else "brain"}),
        **({"direction": direction_report} if direction_report is not None else {}),
        "changed_ml": round(float(touched.sum()) * vox_ml, 3),
        **_change_size(change_src, touched & brain_mask),
        "lesion_ml_added": round(float((labels == 1).sum()) * vox_ml, 3) if lesion_ml_measured else None,
        "lesion_ml_removed": round(float((labels == 2).sum()) * vox_ml, 3) if lesion_ml_measured else None,
        "unchanged_fraction_in_brain": round(float(1 - touched[brain_mask].mean()), 6),
        "source_prompt_origin": source_origin,
        "change_labels_rule": label_rule,
        **_oracle_report(oracle, before, after),
        "model": model.id, "device": str(dev), "timings_s": dict(rep.timings_s),
        "warnings": warnings,
    }
    diff_vol = Volume(delta, scan.affine_ras.copy())
    return EditResult(
        counterfactual=Volume(cf_arr, scan.affine_ras.copy(), source_dtype=scan.source_dtype),
        difference=diff_vol,
        change_labels=Volume(labels, scan.affine_ras.copy(), source_dtype="uint8"),
        report=report,
        model_space={"input": x_model, "reconstruction": recon, "counterfactual": cf, "change": change,
                     "brain": brain_model, **({"edit_region": prompt_region} if prompt_region is not None else {}),
                     **({"fill_region": lesion_region} if inpaint else {}),
                     **({"lesion_prob_before": before["lesion_prob"], "lesion_prob_after": after["lesion_prob"]}
                        if after is not None else {})},
    )


def white_matter_region(white_matter: np.ndarray, brain: np.ndarray, spacing_mm: float, *,
                        probability: float = LESION_EDIT_WM_PROBABILITY,
                        margin_mm: float = LESION_EDIT_WM_MARGIN_MM) -> np.ndarray:
    """Where a lesion-load prompt edit may act: white matter (``white_matter`` ≥ ``probability``) and
    every voxel within ``margin_mm`` of it (Euclidean, voxel centres), inside ``brain``."""
    from scipy.ndimage import distance_transform_edt

    wm = np.asarray(white_matter) >= probability
    if not wm.any():
        return np.zeros(np.shape(brain), bool)
    near = distance_transform_edt(~wm, sampling=float(spacing_mm)) <= float(margin_mm) + 1e-6
    return near & np.asarray(brain, bool)


#: A lesion mask may cover at most this fraction of the brain (the heaviest MS lesion loads are a few
#: percent of it): more is a brain mask, a scan or a mask of another subject given by mistake.
MAX_LESION_MASK_BRAIN_FRACTION = 0.25
#: On FLAIR the median of a lesion mask's voxels should exceed the rest of the brain's by this factor.
LESION_MASK_MIN_BRIGHTNESS = 1.08


def _check_lesion_mask(scan: Volume, lesions: np.ndarray, brain: np.ndarray, contrast: str) -> list[str]:
    """Refuse a lesion mask that covers much of the brain; on FLAIR, warn when its voxels are no brighter
    than the rest of the brain (lesions are bright there: a mask of another scan, or in a template's space)."""
    inside = lesions & brain
    frac = float(inside.sum()) / max(int(brain.sum()), 1)
    if frac > MAX_LESION_MASK_BRAIN_FRACTION:
        raise InputError(f"The lesion mask covers {100 * frac:.0f} % of the brain; a lesion mask marks lesions only "
                         f"(at most {100 * MAX_LESION_MASK_BRAIN_FRACTION:.0f} %). Is it a brain mask, or the scan itself?")
    rest = brain & ~lesions
    if contrast.upper() != "FLAIR" or not inside.any() or not rest.any():
        return []
    med_les, med_rest = float(np.median(scan.array[inside])), float(np.median(scan.array[rest]))
    if med_les > LESION_MASK_MIN_BRIGHTNESS * med_rest:
        return []
    return [f"The lesion mask's voxels are hardly brighter than the rest of the brain (median {med_les:.4g} vs "
            f"{med_rest:.4g}), but on FLAIR lesions are bright (about 1.3 × white matter). Is the mask this scan's, "
            "in its own space (not a template's or another scan's)?"]


def _change_size(change: np.ndarray, touched: np.ndarray) -> dict[str, float | None]:
    """How much the changed voxels changed: the median and 90th percentile of |change| over them, in % of
    the brain's intensity range (model units span 2 from background to the brain's upper percentile).
    A prompt edit of a real scan touches most of the brain a little (the clinical sample FLAIR, high lesion
    load: 73 % of the brain, median 2.7 %), which the changed volume alone does not tell."""
    if not touched.any():
        return {"changed_median_pct": None, "changed_p90_pct": None}
    med, p90 = np.percentile(np.abs(change[touched]), [50, 90]) * 50.0
    return {"changed_median_pct": round(float(med), 2), "changed_p90_pct": round(float(p90), 2)}


def _oracle_reading(oracle: Any, image_model: np.ndarray, grid: Any) -> dict[str, Any]:
    """The oracle's lesion volume (ml, on its grid), lesion class and diagnosis of one model-space image,
    and its lesion probability map carried onto the model grid (``"lesion_prob"``, not for reports)."""
    from .evaluation.metrics import lesion_class_of_ml
    from .evaluation.oracle import to_grid

    pred = oracle.read(np.clip(image_model, *MODEL_INPUT_RANGE)[None], grid)
    ml = float(pred["lesion_ml"][0])
    prob = np.clip(to_grid(pred["lesion_prob"][:1], oracle.grid, grid)[0], 0.0, 1.0)  # outside the oracle's grid → 0
    return {"lesion_ml": ml, "lesion_load": lesion_class_of_ml(ml), "diagnosis": pred["diagnosis"][0],
            "diagnosis_probs": [round(float(p), 4) for p in pred["diagnosis_probs"][0]], "lesion_prob": prob}


def read_series(oracle: Any, series: GeneratedSeries, grid: Any) -> list[dict[str, Any]]:
    """The oracle's reading of each member of a generated series: lesion ml, lesion-load class, diagnosis.

    The members are read as ``counterfactualgen evaluate`` reads them (model units on the
    model's ``grid``, resampled onto the oracle's), so these are the same estimates its
    report aggregates; they are the oracle's estimates, not ground truth (its card has its
    validation).
    """
    from .evaluation.metrics import lesion_class_of_ml

    pred = oracle.read(series.model_units(), grid)
    return [{"lesion_ml": round(float(ml), 2), "lesion_load": lesion_class_of_ml(float(ml)), "diagnosis": str(dx)}
            for ml, dx in zip(pred["lesion_ml"], pred["diagnosis"])]


def seamless_fill_change(scan_units: np.ndarray, fill: np.ndarray, mask: np.ndarray,
                         spacing_mm: Sequence[float]) -> np.ndarray:
    """The change, on the scan's grid, that lesion filling with a lesion mask writes: the model's fill
    (interpolated to the scan's grid) in the masked voxels, plus the harmonic interpolant of its
    mismatch with the scan just outside them (seamless cloning, Pérez et al. 2003); 0 elsewhere.

    The model fills at its own grid (5 mm for the demo model). Adding that grid's change, spread by
    interpolation (as prompt edits do), left most of a finer scan's lesion contrast in place and
    darkened the voxels around the lesions; writing the fill alone left a seam where its level differs
    from the scan's (on the clinical sample, grey patches darker than the white matter). On 6 held-out
    engine subjects with their exact lesion-free twins (``Testing/Benchmarks/bench_fine_filling.py
    --seed 0``, with ``--spacing 5 5 5`` for the model grid; PSNR in the brain):

    ============================  ========  ======  =======  ============
    subjects                      unedited  spread  this     Laplace only
    ============================  ========  ======  =======  ============
    1 × 1 × 3 mm                  36.2 dB   37.9    50.0     50.3
    model grid (5 mm)             36.2 dB   43.5    44.5     45.1
    ============================  ========  ======  =======  ============

    "Laplace only" fills the mask by harmonic interpolation of the scan, without the model: the
    classical baseline scores as well, which says what a 5 mm model adds to a fill (little). The rule
    was chosen on subjects 200–203 (1 × 1 × 3 mm: 47.0 vs 37.4 dB) and 200–205 (model grid: 42.9 vs
    42.8 dB). The filled voxels are smooth: they carry no noise texture. A fill of the oracle's 5 mm
    segmentation keeps the spread change: written this way into the segmentation's footprint on the
    scan's grid it scored lower (36.5 vs 37.2 dB at 1 × 1 × 3 mm, 38.81 vs 38.85 dB on the model grid),
    since that footprint holds healthy voxels too.

    Args:
        scan_units: the scan in model units, on its own grid.
        fill: the model's counterfactual (model units) interpolated to the scan's grid.
        mask: the voxels to fill (the lesion mask inside the brain).
        spacing_mm: the scan's voxel size.
    """
    from .geometry import harmonic_interpolate

    mask = np.asarray(mask, bool)
    mismatch = np.where(mask, 0.0, np.asarray(scan_units, np.float64) - np.asarray(fill, np.float64))
    offset = harmonic_interpolate(mismatch, mask, spacing_mm)
    return np.where(mask, fill + offset - scan_units, 0.0).astype(np.float32)


def oracle_lesion_region(prob: np.ndarray, brain: np.ndarray, threshold: float = AUTO_MASK_PROBABILITY) -> np.ndarray:
    """The voxels lesion filling regenerates when no lesion mask is given: the oracle's segmentation
    (lesion probability ≥ ``threshold``, default :data:`AUTO_MASK_PROBABILITY`) inside the brain.

    Not grown: on 6 held-out engine subjects (seeds 200–205, moderate/high load, the demo model)
    filling this region scored PSNR 38.5 dB against the exact lesion-free twin (unedited 35.2 dB),
    with the region grown by one voxel 32.5 dB and by two 28.6 dB, because every healthy voxel the
    fill regenerates moves away from the subject's own tissue. Thresholds 0.2 / 0.3 / 0.7 gave
    38.2 / 38.4 / 38.6 dB (0.7 left lesions the oracle still reads in half of the subjects);
    ``Testing/Benchmarks/bench_oracle_fill_mask.py`` recomputes these.
    """
    return (np.asarray(prob) >= threshold) & np.asarray(brain, bool)


#: The change-label rule of a prompt edit without an oracle (its report has no lesion ml).
NO_ORACLE_RULE = ("every change is 3: a prompt edit labels lesions added/removed only where an oracle segments "
                  "them (--oracle); no lesion ml without one")


def change_labels(change: np.ndarray, touched: np.ndarray, *, lesion_prompt: bool, inpainting: bool = False,
                  oracle_before: np.ndarray | None = None, oracle_after: np.ndarray | None = None,
                  oracle_delta: float = ORACLE_LESION_DELTA) -> tuple[np.ndarray, str]:
    """The change labelmap (1 lesion added, 2 lesion removed, 3 other change) on the scan's grid.

    Args:
        change: the edit's change in model units, on the scan's grid.
        touched: the voxels the edit changed.
        lesion_prompt: a lesion-load edit of a FLAIR model (otherwise every change is 3).
        inpainting: lesion filling inside a lesion region: darkening by ≥ :data:`LESION_DELTA` is 2.
        oracle_before, oracle_after: the oracle's lesion probability of the scan and of the
            counterfactual, on the scan's grid; for a prompt edit, lesion labels need the oracle's
            segmentation and |change| ≥ ``oracle_delta``. A prompt edit without them labels every
            change 3 (:data:`NO_ORACLE_RULE`).
        oracle_delta: the |change| threshold with the oracle (default :data:`ORACLE_LESION_DELTA`).

    Returns:
        (labels as float32, the rule used, for the report).
    """
    labels = np.zeros(change.shape, np.float32)
    labels[touched] = 3
    if not lesion_prompt:
        return labels, "every change is 3 (not a lesion-load edit of a FLAIR model)"
    if inpainting:  # lesion filling removes lesions: what it brightens (a mask's rim of CSF) is not a lesion
        labels[change <= -LESION_DELTA] = 2
        return labels, (f"2: darkened by ≥ {LESION_DELTA} (model units) inside the filled region; anything else "
                        "changed is 3 (filling adds no lesion)")
    if oracle_before is not None and oracle_after is not None:
        p = AUTO_MASK_PROBABILITY
        labels[(change >= oracle_delta) & (oracle_after >= p) & touched] = 1
        labels[(change <= -oracle_delta) & (oracle_before >= p) & touched] = 2
        return labels, (f"1/2: brightened/darkened by ≥ {oracle_delta:g} (model units) where the oracle segments "
                        f"a lesion (probability ≥ {p}) after/before the edit")
    return labels, NO_ORACLE_RULE


def _oracle_report(oracle: Any, before: dict | None, after: dict | None) -> dict:
    if oracle is None or before is None or after is None:
        return {"lesion_ml_before": None, "lesion_ml_after": None, "oracle": None,
                "lesion_ml_note": "no oracle given (--oracle): lesion added/removed ml only for lesion filling "
                                  "(from the change labelmap inside the filled region); none for prompt edits"}
    return {"lesion_ml_before": round(before["lesion_ml"], 3), "lesion_ml_after": round(after["lesion_ml"], 3),
            "lesion_load_before": before["lesion_load"], "lesion_load_after": after["lesion_load"],
            "diagnosis_before": before["diagnosis"], "diagnosis_after": after["diagnosis"],
            "diagnosis_probs_before": before["diagnosis_probs"], "diagnosis_probs_after": after["diagnosis_probs"],
            "oracle": oracle.id,
            "lesion_ml_note": f"before/after: oracle '{oracle.id}' on the brain in model space "
                              f"({oracle.grid.spacing_mm} mm grid; trained and validated on synthetic engine subjects "
                              "only, so on a real scan its reading is an estimate no expert mask has checked; on a "
                              "brain it was not trained on (an MS patient's) it read the lesion-load class right "
                              "in 82 % and the diagnosis in 80 %, and found 0.5 ml or more in half of the "
                              "lesion-free subjects, so do not rely on its diagnosis, nor on a reading of a few "
                              "ml); "
                              "added/removed: the change labelmap on the scan's grid"}


def _default_source_prompt(target: str, reading: dict | None = None) -> tuple[str, str]:
    """The prompt the scan is assumed to match when none is given, and where it came from.

    With an oracle reading: the reading's class on the target's scale. Without: the
    opposite end of the target's scale (no lesions for a lesion prompt, CN for a
    diagnosis prompt; moderate / AD when the target is that end).
    """
    from .text.prompts import canonical_prompt, classify_prompt

    c = classify_prompt(target)
    if c.get("lesion_load") is not None:
        if reading is not None:
            return canonical_prompt(lesion_load=reading["lesion_load"]), "oracle reading of the scan"
        return canonical_prompt(lesion_load="none" if c["lesion_load"] != "none" else "moderate"), "opposite of target"
    if c.get("diagnosis") is not None:
        if reading is not None:
            return canonical_prompt(diagnosis=reading["diagnosis"]), "oracle reading of the scan"
        return canonical_prompt(diagnosis="CN" if c["diagnosis"] != "CN" else "AD"), "opposite of target"
    return "", "null prompt (target not on a known scale)"  # unknown: invert under the null prompt


#: Words in a scan's name that name an MRI contrast (lower case, whole words of the name).
CONTRAST_NAME_WORDS = {
    "FLAIR": ("flair", "tirm", "darkfluid"),
    "T1": ("t1", "t1w", "mprage", "mp2rage", "spgr", "bravo", "t1c", "t1ce", "t1gd"),
    "T2": ("t2", "t2w", "t2star", "swi", "pd", "pdw"),
    "diffusion": ("dwi", "adc", "dti"),
    "CT": ("ct",),
}


def contrast_name_warning(name: str, model_contrast: str, model_id: str = "the model") -> str | None:
    """The warning for a scan whose name names another contrast than the model's, or ``None``.

    A FLAIR model edits any brain it can register, and a T1-weighted scan registers to the
    FLAIR template as well as a FLAIR does (the clinical sample: correlation 0.49 vs 0.41), so
    a mix-up (both are loaded in Slicer) would pass silently. Intensities did not tell them apart
    reliably (white minus grey matter in the registered template's masks: real FLAIR −0.14 / −0.03,
    real T1 +0.17 / +0.07, but synthetic FLAIR up to +0.04 and T1 down to +0.03;
    ``Testing/Benchmarks/bench_contrast_check.py``), so the name is read: ``longitudinal_patient04_study1_T1W.nii.gz`` names T1. A name that also names the model's
    contrast ("T1_FLAIR") is not warned about.
    """
    words = set(re.split(r"[^a-z0-9]+", str(name).lower()))
    own = CONTRAST_NAME_WORDS.get(str(model_contrast).upper(), (str(model_contrast).lower(),))
    if words & set(own):
        return None
    for contrast, names in CONTRAST_NAME_WORDS.items():
        if contrast.upper() != str(model_contrast).upper() and words & set(names):
            return (f"The scan's name '{name}' suggests a {contrast} scan, but model '{model_id}' was trained on "
                    f"{model_contrast}: an edit of another contrast is not meaningful (the lesions it draws and the "
                    f"oracle's readings assume {model_contrast}). Choose the {model_contrast} scan, or ignore this "
                    "if the name is wrong.")
    return None


def same_class_warning(source_prompt: str, target_prompt: str, source_origin: str) -> str | None:
    """The warning for a prompt edit whose source already names the target's class, or ``None``.

    Such an edit regenerates the scan under two prompts that mean the same thing, so it changes
    little or nothing (only voxels whose change reaches :data:`CHANGE_EPS` are written). The
    classes compared are those the target names (lesion load, diagnosis); prompts on no known
    scale are compared as text.
    """
    from .text.prompts import classify_prompt

    src, tgt = classify_prompt(source_prompt), classify_prompt(target_prompt)
    keys = [k for k in ("lesion_load", "diagnosis") if tgt.get(k) is not None]
    if keys:
        if any(src.get(k) != tgt[k] for k in keys):
            return None
        named = " and ".join(f"{'lesion load' if k == 'lesion_load' else 'diagnosis'} '{tgt[k]}'" for k in keys)
    elif " ".join(source_prompt.lower().split()) == " ".join(target_prompt.lower().split()):
        named = "the same text"
    else:
        return None
    hint = ("choose a target that differs from the source" if source_origin == "given" else
            "give --from (in Slicer: Source description) with what the scan shows if that reading is wrong, "
            "or choose a different target")
    return (f"The source prompt '{source_prompt}' ({source_origin}) and the target '{target_prompt}' both name "
            f"{named}, so this edit changes little or nothing: {hint}.")
