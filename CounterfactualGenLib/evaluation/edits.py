"""Edits of synthetic scans measured against their exact twins, and the counterfactual axioms.

Nobody can say how far a counterfactual of a *real* scan is from the truth: the truth is
never observed. The synthetic engine (:mod:`CounterfactualGenLib.synth`) makes it
observable: :func:`~CounterfactualGenLib.synth.make_twin` gives the same person with the
lesions removed (or added), bit-identical everywhere else. For each held-out subject:

* **lesion filling** — the subject with lesions, edited to "Subject has no lesions."
  without a mask (the editor's default: with an oracle, the oracle's lesion segmentation is
  filled), by text alone (``auto_lesion_mask=False``), and with the true lesion mask
  (``--lesion-mask``, the MS-pipeline use), is compared with its lesion-free twin: PSNR / MAE in the brain (model units, range 2),
  the same for the unedited scan (the "do nothing" baseline the edit must beat), Dice
  of the change labelmap's "lesion removed" voxels against the true lesions, the
  oracle's lesion volume after the edit against the truth (0 ml), and the fraction of
  voxels outside the brain that are bit-identical to the input;
* **lesion addition** — the lesion-free twin edited to the subject's own lesion class,
  compared with the subject: oracle volume vs the true volume (where lesions appear is
  not determined by the prompt, so Dice here measures only overlap by chance + prior);
* **diagnosis edit** — the subject's cognitively normal twin edited to "Subject has mild Alzheimer's
  dementia (AD).", compared with its exact AD twin (the same person with AD-level atrophy: enlarged
  ventricles, thinner cortex): PSNR / MAE in the brain against the AD twin and for the unedited CN
  twin, and the oracle's diagnosis after the edit (effectiveness: read as AD);
* **axioms** (Monteiro et al., ICLR 2023) — composition: L1 in the brain between the
  scan and m = 1, 2, 10 repeated null edits (target = source prompt); reversibility:
  L1 between the scan and its high → none → high cycle; effectiveness: the fraction of
  edits whose oracle lesion class after the edit is the target's.

:func:`evaluate_edits` works on any ``edit(scan, target, source, lesion_mask) →
EditResult``-like callable so the tests can check that the numbers respond (an
"oracle-perfect" edit that returns the twin scores Dice 1 and PSNR ∞).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

import numpy as np

from ..errors import InputError
from ..text.prompts import DIAGNOSIS_CLASSES, canonical_prompt

__all__ = ["DEFAULT_EDIT_TASKS", "DIAGNOSIS_EDITS", "EDIT_SIZES", "EDIT_TASKS", "atrophy_pair", "best_worst_montage",
           "diagnosis_twin", "evaluate_edits", "held_out_pairs", "model_editor", "summarise_edits"]

#: Repeated null edits for the composition axiom (Monteiro et al. use m = 1, 2, 10).
EDIT_SIZES = (1, 2, 10)
#: The edits :func:`evaluate_edits` can run per subject: lesion filling (without a mask: the oracle's segmentation;
#: by the text alone; with the true mask), lesion addition, the diagnosis edit CN → AD, the axioms (composition,
#: reversibility), CN → MCI (``"mci"``: does a diagnosis edit stop at MCI or overshoot to AD?) and AD → CN (``"cn"``:
#: an edit down the diagnosis scale). :data:`DEFAULT_EDIT_TASKS` are the card's.
EDIT_TASKS = ("fill", "fill_text_only", "fill_with_mask", "add", "atrophy", "axioms", "mci", "cn")
DEFAULT_EDIT_TASKS = ("fill", "fill_text_only", "fill_with_mask", "add", "atrophy", "axioms")
NONE_PROMPT = "Subject has no lesions."
#: The diagnosis edits by task: (the input twin's diagnosis, the target twin's), each against the exact target twin.
DIAGNOSIS_EDITS = {"atrophy": ("CN", "AD"), "mci": ("CN", "MCI"), "cn": ("AD", "CN")}

Editor = Callable[..., Any]  # (scan Volume, target, source, brain_mask, lesion_mask, auto_lesion_mask) -> result


def model_editor(model: Any, encoder: Any, oracle: Any | None, *, steps: int | None = None,
                 guidance: float | None = None, strength: float | None = None, seed: int = 0, device: str = "auto",
                 should_cancel: Callable[[], bool] | None = None) -> Editor:
    """An editor for :func:`evaluate_edits` that runs :func:`~CounterfactualGenLib.pipeline.edit_scan`
    (``strength`` ``None``: each edit's default, :func:`~CounterfactualGenLib.pipeline.edit_strength`)."""
    from ..pipeline import EDIT_STRENGTHS, edit_scan

    settings = {"strength": strength, "edit_region": "auto", "direction": "auto"}  # also recorded in the report

    def edit(scan, *, target: str, source: str, brain_mask: np.ndarray, lesion_mask: np.ndarray | None = None,
             auto_lesion_mask: bool = True):
        return edit_scan(model, encoder, scan, target_prompt=target, source_prompt=source, brain_mask=brain_mask,
                         lesion_mask=lesion_mask, steps=steps, guidance=guidance, seed=seed, registration="none",
                         oracle=oracle, auto_lesion_mask=auto_lesion_mask, device=device, should_cancel=should_cancel,
                         **settings)

    edit.settings = {**settings, "strength": dict(EDIT_STRENGTHS) if strength is None else float(strength)}
    return edit


def _units(image: np.ndarray, brain: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """Model intensity units fitted on the factual scan (background −1, brain p99.5 +1), for every compared array."""
    from ..intensity import IntensityNormalizer

    norm = IntensityNormalizer.fit(image, brain, upper_percentile=99.5)
    return lambda a: norm.forward(np.asarray(a, np.float32))


def _comparison(cf: np.ndarray, truth: np.ndarray, factual: np.ndarray, brain: np.ndarray, u) -> dict[str, float]:
    from .metrics import mae, psnr

    return {"psnr_db": round(psnr(u(cf), u(truth), brain), 3), "mae": round(mae(u(cf), u(truth), brain), 5),
            "baseline_psnr_db": round(psnr(u(factual), u(truth), brain), 3),
            "baseline_mae": round(mae(u(factual), u(truth), brain), 5)}


def _outside_identical(cf: np.ndarray, scan: np.ndarray, brain: np.ndarray) -> float:
    out = ~brain
    return float(np.mean(cf[out] == scan[out])) if out.any() else 1.0


def held_out_pairs(grid: Any, n_subjects: int, *, seed: int = 0, contrast: str = "FLAIR",
                   lesion_classes: Sequence[str] = ("moderate", "high"), anatomy: str = "icbm152"):
    """Yield ``(subject, lesion-free twin)`` pairs of held-out engine subjects on ``grid``.

    Seeds come from a generator the training pools never use; the same arguments give the
    same pairs (so a test can rebuild them).
    """
    from ..synth import make_subject, make_twin, random_spec

    rng = np.random.default_rng(9_000_000 + int(seed))
    geo = {"shape": tuple(grid.shape), "spacing_mm": grid.spacing_mm, "center_mm": tuple(grid.center_ras)}
    for k in range(int(n_subjects)):
        spec = random_spec(rng, lesion_class=lesion_classes[k % len(lesion_classes)], contrast=contrast,
                           anatomy=anatomy)
        yield make_subject(spec, **geo), make_twin(spec, lesion_class="none", **geo)


def atrophy_pair(subject: Any, grid: Any) -> tuple[Any, Any]:
    """``(CN twin, AD twin)`` of an engine subject on ``grid``: the same person, lesions and scan at the
    two ends of the atrophy scale (the diagnosis edit's input and its exact truth)."""
    return diagnosis_twin(subject, grid, "CN"), diagnosis_twin(subject, grid, "AD")


def diagnosis_twin(subject: Any, grid: Any, diagnosis: str) -> Any:
    """The twin of an engine subject on ``grid`` at a diagnosis's atrophy level (CN / MCI / AD): the same person,
    lesions and scan."""
    from ..synth import make_twin

    geo = {"shape": tuple(grid.shape), "spacing_mm": grid.spacing_mm, "center_mm": tuple(grid.center_ras)}
    return make_twin(subject.spec, diagnosis=diagnosis, **geo)


def evaluate_edits(
    edit: Editor,
    *,
    grid: Any,
    n_subjects: int,
    seed: int = 0,
    contrast: str = "FLAIR",
    lesion_classes: Sequence[str] = ("moderate", "high"),
    composition_sizes: Sequence[int] = EDIT_SIZES,
    anatomy: str = "icbm152",
    tasks: Sequence[str] = DEFAULT_EDIT_TASKS,
    on_event: Callable[[dict], None] | None = None,
) -> dict[str, Any]:
    """Edit held-out engine subjects on ``grid`` and measure them against their exact twins.

    Args:
        edit: ``edit(scan, target=, source=, brain_mask=, lesion_mask=)`` → an object with
            ``counterfactual`` (Volume), ``change_labels`` (Volume) and ``report`` (dict with
            ``lesion_ml_after`` and ``timings_s``), as :func:`model_editor` returns.
        grid: the model grid the subjects are made on (``shape``, ``spacing_mm``, ``center_ras``).
        n_subjects: held-out subjects (seeds differ from the training pools' generator).
        seed: first subject seed.
        contrast: engine contrast.
        lesion_classes: the factual subjects' lesion classes, cycled.
        composition_sizes: numbers of repeated null edits; () skips the composition axiom.
        anatomy: the engine anatomy of the subjects (``synth.ANATOMIES``).
        tasks: which of :data:`EDIT_TASKS` to run (a benchmark of one kind of edit skips the others).
        on_event: progress/log callback.

    Returns:
        JSON-ready dict: ``per_subject`` rows and ``summary`` (means; see :func:`summarise_edits`).
    """
    from ..geometry import harmonic_interpolate
    from .metrics import dice, lesion_class_of_ml, mae

    if n_subjects < 1:
        raise InputError("Evaluate edits on at least one subject.")
    unknown = sorted(set(tasks) - set(EDIT_TASKS))
    if unknown or not tasks:
        raise InputError(f"Unknown edit task(s) {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(EDIT_TASKS)}.")
    emit = on_event or (lambda e: None)
    rows: list[dict[str, Any]] = []
    examples: list[dict[str, Any]] = []
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    n_max = max([0, *composition_sizes])
    pairs = held_out_pairs(grid, n_subjects, seed=seed, contrast=contrast, lesion_classes=lesion_classes,
                           anatomy=anatomy)
    for k, (subj, twin) in enumerate(pairs):
        emit({"event": "progress", "stage": "evaluate_edits", "step": k, "total": int(n_subjects), "eta_s": None})
        spec, lclass = subj.spec, subj.attributes["lesion_load"]
        scan, clean = subj.image, twin.image
        brain = subj.brain_mask > 0
        true_lesions = (subj.lesion_mask > 0) & ~(twin.lesion_mask > 0)
        true_ml = float(subj.attributes["lesion_ml"])
        u = _units(scan.array, brain)
        src = canonical_prompt(lesion_load=subj.attributes["lesion_load"])
        row: dict[str, Any] = {"subject_seed": int(spec.seed), "lesion_class": subj.attributes["lesion_load"],
                               "true_lesion_ml": round(true_ml, 3), "diagnosis": subj.attributes["diagnosis"]}

        def run(name: str, image, *, target: str, source: str, lesion_mask=None, brain_mask=None, **kw):
            t = time.perf_counter()
            res = edit(image, target=target, source=source, brain_mask=brain if brain_mask is None else brain_mask,
                       lesion_mask=lesion_mask, **kw)
            timings[name] = timings.get(name, 0.0) + time.perf_counter() - t
            for stage, s in (res.report.get("timings_s") or {}).items():
                timings[f"stage:{stage}"] = timings.get(f"stage:{stage}", 0.0) + float(s)
            timings["n_edits"] = timings.get("n_edits", 0) + 1
            return res

        # -- lesion filling: no mask (the editor's default: the oracle's segmentation), text only, true mask --
        fills = (("fill", None, {}), ("fill_text_only", None, {"auto_lesion_mask": False}),
                 ("fill_with_mask", subj.lesion_mask, {}))
        for name, lmask, kw in fills:
            if name not in tasks:
                continue
            res = run(name, scan, target=NONE_PROMPT, source=src, lesion_mask=lmask, **kw)
            cf = res.counterfactual.array
            if name == "fill":
                examples.append({"input": scan, "filled": res.counterfactual, "twin": clean})
            removed = res.change_labels.array == 2
            after = res.report.get("lesion_ml_after")
            row[name] = {**_comparison(cf, clean.array, scan.array, brain, u),
                         "dice_removed_vs_true": round(dice(removed, true_lesions), 4) if true_lesions.any() else None,
                         "labelmap_removed_ml": res.report.get("lesion_ml_removed"),
                         "oracle_ml_before": res.report.get("lesion_ml_before"), "oracle_ml_after": after,
                         "oracle_ml_error_vs_twin": None if after is None else round(abs(float(after)), 3),
                         "oracle_class_after": None if after is None else lesion_class_of_ml(float(after)),
                         "outside_brain_bit_identical": _outside_identical(cf, scan.array, brain),
                         "changed_ml": res.report.get("changed_ml")}
            if name == "fill_with_mask":  # the classical baseline: the mask filled by harmonic interpolation alone
                laplace = harmonic_interpolate(scan.array, (subj.lesion_mask > 0) & brain, scan.spacing_mm)
                row[name]["laplace_psnr_db"] = _comparison(laplace.astype(np.float32), clean.array, scan.array, brain,
                                                           u)["psnr_db"]

        # -- lesion addition: the clean twin edited to the subject's class ---------------------
        if "add" in tasks:
            res = run("add", clean, target=src, source=NONE_PROMPT)
            cf = res.counterfactual.array
            added = res.change_labels.array == 1
            after = res.report.get("lesion_ml_after")
            row["add"] = {**_comparison(cf, scan.array, clean.array, brain, u),
                          "dice_added_vs_true": round(dice(added, true_lesions), 4) if true_lesions.any() else None,
                          "labelmap_added_ml": res.report.get("lesion_ml_added"),
                          "oracle_ml_before": res.report.get("lesion_ml_before"), "oracle_ml_after": after,
                          "oracle_ml_error_vs_twin": None if after is None else round(abs(float(after) - true_ml), 3),
                          "oracle_class_after": None if after is None else lesion_class_of_ml(float(after)),
                          "outside_brain_bit_identical": _outside_identical(cf, clean.array, brain)}

        # -- diagnosis: the CN twin edited to AD (MCI), the AD twin to CN, against the exact target twin --------
        for task, (src_dx, tgt_dx) in DIAGNOSIS_EDITS.items():
            if task not in tasks:
                continue
            before, truth = diagnosis_twin(subj, grid, src_dx), diagnosis_twin(subj, grid, tgt_dx)
            b_brain = before.brain_mask > 0
            res = run(task, before.image, target=canonical_prompt(diagnosis=tgt_dx),
                      source=canonical_prompt(diagnosis=src_dx), brain_mask=b_brain)
            cf = res.counterfactual.array
            row[task] = {**_comparison(cf, truth.image.array, before.image.array, b_brain,
                                       _units(before.image.array, b_brain)),
                         "oracle_diagnosis_before": res.report.get("diagnosis_before"),
                         "oracle_diagnosis_after": res.report.get("diagnosis_after"),
                         "outside_brain_bit_identical": _outside_identical(cf, before.image.array, b_brain),
                         "changed_ml": res.report.get("changed_ml")}

        # -- axioms -------------------------------------------------------------------------------
        if "axioms" in tasks:
            if n_max:
                y = scan
                comp = {}
                for m in range(1, n_max + 1):
                    y = run("composition", y, target=src, source=src).counterfactual
                    if m in composition_sizes:
                        comp[str(m)] = round(mae(u(scan.array), u(y.array), brain), 5)
                row["composition_l1"] = comp
            back = run("reversibility", run("reversibility", scan, target=NONE_PROMPT, source=src).counterfactual,
                       target=src, source=NONE_PROMPT).counterfactual
            row["reversibility_l1"] = round(mae(u(scan.array), u(back.array), brain), 5)
        rows.append(row)
        if "fill" in row and "fill_with_mask" in row:
            emit({"event": "log", "level": "info",
                  "message": f"edit subject {k + 1}/{n_subjects} ({lclass}, {true_ml:.1f} ml): fill PSNR "
                             f"{row['fill']['psnr_db']} dB (baseline {row['fill']['baseline_psnr_db']}), Dice "
                             f"{row['fill_with_mask']['dice_removed_vs_true']} with mask"})
        else:
            emit({"event": "log", "level": "info", "message": f"edit subject {k + 1}/{n_subjects} done"})
    emit({"event": "progress", "stage": "evaluate_edits", "step": int(n_subjects), "total": int(n_subjects),
          "eta_s": 0})
    n_edits = max(1, int(timings.pop("n_edits", 1)))
    stage = {k.split(":", 1)[1]: round(v / n_edits, 4) for k, v in timings.items() if k.startswith("stage:")}
    return {"n_subjects": len(rows), "per_subject": rows, "summary": summarise_edits(rows),
            "seconds_per_edit_by_stage": stage, "seconds_per_edit": round(
                sum(v for k, v in timings.items() if not k.startswith("stage:")) / n_edits, 4),
            "n_edits": n_edits, "total_s": round(time.perf_counter() - t0, 3), "_examples": examples}


def best_worst_montage(result: dict[str, Any], path: Any) -> Any:
    """PNG of the lesion-filling edits with the largest and smallest PSNR gain over doing nothing.

    Rows: input, filled counterfactual, exact twin — for the best, then the worst subject.
    Pops ``result["_examples"]`` (volumes are not JSON).
    """
    from ..overlay import montage_png

    ex = result.pop("_examples", [])
    if not ex:
        return None
    gain = []
    for r in result["per_subject"]:
        f = r["fill"]
        g = f["psnr_db"] - f["baseline_psnr_db"]
        gain.append(g if np.isfinite(g) else np.inf)
    order = [int(np.argmax(gain)), int(np.argmin(gain))]
    vols, labels = [], []
    for tag, k in zip(("best", "worst"), order if len(ex) > 1 else order[:1]):
        r = result["per_subject"][k]
        for key, what in (("input", f"input ({r['lesion_class']}, {r['true_lesion_ml']} ml)"),
                          ("filled", f"filled, PSNR {r['fill']['psnr_db']} dB vs twin"),
                          ("twin", f"exact lesion-free twin (input: {r['fill']['baseline_psnr_db']} dB)")):
            vols.append(ex[k][key])
            labels.append(f"{tag}: {what} [SYNTHETIC]")
    return montage_png(vols, labels, path)


def summarise_edits(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over subjects of every number in the rows (None where nothing was measured)."""

    def mean(path: Sequence[str]) -> float | None:
        vals = []
        for r in rows:
            v: Any = r
            for p in path:
                v = v.get(p) if isinstance(v, dict) else None
            if isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v):
                vals.append(float(v))
        return round(float(np.mean(vals)), 4) if vals else None

    out: dict[str, Any] = {}
    fill_keys = ("psnr_db", "baseline_psnr_db", "mae", "baseline_mae", "dice_removed_vs_true",
                 "oracle_ml_error_vs_twin", "outside_brain_bit_identical", "changed_ml")
    for task, keys in (("fill", fill_keys), ("fill_text_only", fill_keys),
                       ("fill_with_mask", ("psnr_db", "baseline_psnr_db", "mae", "baseline_mae",
                                           "dice_removed_vs_true", "oracle_ml_error_vs_twin",
                                           "outside_brain_bit_identical", "laplace_psnr_db")),
                       ("add", ("psnr_db", "baseline_psnr_db", "mae", "baseline_mae", "dice_added_vs_true",
                                "oracle_ml_error_vs_twin", "outside_brain_bit_identical"))):
        if not any(task in r for r in rows):
            continue
        out[task] = {k: mean((task, k)) for k in keys}
        hits = [r[task]["oracle_class_after"] == ("none" if task != "add" else r["lesion_class"])
                for r in rows if r[task].get("oracle_class_after") is not None]
        out[task]["effectiveness"] = round(float(np.mean(hits)), 4) if hits else None
    for task, (_, diagnosis) in DIAGNOSIS_EDITS.items():
        if not any(task in r for r in rows):
            continue
        out[task] = {k: mean((task, k)) for k in ("psnr_db", "baseline_psnr_db", "mae", "baseline_mae",
                                                  "outside_brain_bit_identical", "changed_ml")}
        read = [r[task]["oracle_diagnosis_after"] for r in rows
                if task in r and r[task].get("oracle_diagnosis_after") is not None]
        out[task]["effectiveness"] = round(float(np.mean([d == diagnosis for d in read])), 4) if read else None
        out[task]["read_as"] = {d: sum(x == d for x in read) for d in DIAGNOSIS_CLASSES}
        if task == "mci":  # a diagnosis edit that goes too far
            out[task]["read_as_ad"] = round(float(np.mean([d == "AD" for d in read])), 4) if read else None
    sizes = sorted({int(m) for r in rows for m in (r.get("composition_l1") or {})})
    out["composition_l1"] = {str(m): mean(("composition_l1", str(m))) for m in sizes}
    out["reversibility_l1"] = mean(("reversibility_l1",))
    return out
