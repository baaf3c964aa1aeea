"""``counterfactualgen`` — the command line, and the contract every front end uses.

The Slicer module, headless batch mode, the tests and shell users all run these
commands. With ``--progress-json`` stdout carries one JSON object per line
(``progress``, ``log``, ``error`` and a final ``done`` event naming the summary file);
human messages go to stderr. Exit codes: 0 ok, 2 usage/user error, 3 bad input,
4 model problem, 5 out of memory or a missing package, 130 cancelled, 1 internal error.

Outputs are written into a hidden staging folder and moved into ``--out`` only when
the whole job succeeded; on error or SIGINT/SIGTERM nothing half-made is left.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from . import __version__
from .errors import Cancelled, CounterfactualGenError, InputError, ResourceError
from .overlay import MONTAGE_LABEL_CHARS

LESION_SERIES = [
    "Subject has no lesions.",
    "Subject has minimal lesion load.",
    "Subject has moderate lesion load.",
    "Subject has high lesion load.",
]
DIAGNOSIS_SERIES = [
    "Subject is cognitively normal (CN).",
    "Subject has mild cognitive impairment (MCI).",
    "Subject has mild Alzheimer's dementia (AD).",
]


# ---------------------------------------------------------------------------------
# progress / events
# ---------------------------------------------------------------------------------
class Events:
    """Routes pipeline events to JSON lines (stdout) or a terminal progress bar (stderr)."""

    def __init__(self, json_mode: bool, quiet: bool = False) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self._bar = None
        self._bar_stage = None
        self.cancel_requested = False

    def emit(self, event: dict) -> None:
        if self.json_mode:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
            return
        if self.quiet:
            return
        if event.get("event") == "progress":
            self._progress(event)
        elif event.get("event") == "log":
            self._close_bar()
            prefix = "warning: " if event.get("level") == "warning" else ""
            print(prefix + str(event.get("message", "")), file=sys.stderr)

    def _progress(self, e: dict) -> None:
        total, step, stage = int(e.get("total") or 1), int(e.get("step") or 0), e.get("stage")
        if total <= 1:
            return
        if self._bar is None or self._bar_stage != stage:
            self._close_bar()
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=stage, unit="step", file=sys.stderr, leave=False,
                             disable=not sys.stderr.isatty())
            self._bar_stage = stage
        self._bar.n = step
        self._bar.refresh()
        if step >= total:
            self._close_bar()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._bar_stage = None

    def log(self, msg: str) -> None:
        self.emit({"event": "log", "level": "info", "message": msg})

    def warn(self, msg: str) -> None:
        self.emit({"event": "log", "level": "warning", "message": msg})

    def should_cancel(self) -> bool:
        return self.cancel_requested


class StagedOutput:
    """Write into ``OUT/.partial-XXXX``; move the files into OUT only on success.

    Nothing the user had is lost: a file of ``protect`` (the input scan, its masks) is never
    replaced, whatever its name, and any other existing file of the same name only with
    ``overwrite`` (the check runs before anything moves, so a refusal leaves OUT as it was).
    """

    def __init__(self, out: Path, *, protect: Sequence[str | Path] = (), overwrite: bool = False) -> None:
        self.out = out
        self.protect = [Path(p) for p in protect if p]
        self.overwrite = overwrite
        self.created_out = not out.exists()
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} exists and is not a folder.")
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.stage = Path(tempfile.mkdtemp(prefix=".partial-", dir=str(out)))
        except OSError as exc:
            raise InputError(f"Cannot write to --out {out}: {exc.strerror or exc}. Choose a folder you can write "
                             "to.") from None

    def path(self, name: str) -> Path:
        return self.stage / name

    def final(self, name: str) -> Path:
        return self.out / name

    def commit(self) -> list[Path]:
        staged = sorted(self.stage.iterdir())
        for f in staged:
            dest = self.out / f.name
            if not dest.exists():
                continue
            if any(p.exists() and os.path.samefile(dest, p) for p in self.protect):
                raise InputError(f"{dest} is an input of this run; it is never overwritten. Choose another --out.")
            if not self.overwrite:
                raise InputError(f"{dest} already exists; choose another --out, or pass --overwrite to replace it.")
        moved = []
        for f in staged:
            dest = self.out / f.name
            os.replace(f, dest)
            moved.append(dest)
        self.stage.rmdir()
        return moved

    def abort(self) -> None:
        shutil.rmtree(self.stage, ignore_errors=True)
        if self.created_out:
            try:
                self.out.rmdir()  # only if empty: never delete anything the user had there
            except OSError:
                pass


def check_out(out: str | Path, *, overwrite: bool, protect: Sequence[str | Path] = ()) -> None:
    """Before anything slow runs: ``--out`` must be a folder this user can write, not hold an input
    of the run, and be empty unless ``overwrite`` (hidden entries, such as a cancelled run's
    ``.partial-*``, do not count)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder.")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"Cannot write to --out {out}: {parent} is not writable. Choose a folder you can write to.")
    if not out.exists():
        return
    inside = [p for p in protect if p and Path(p).exists() and Path(p).resolve().parent == out.resolve()]
    if inside and not overwrite:
        raise InputError(f"--out {out} holds an input of this run ({Path(inside[0]).name}); write the results to "
                         "another folder.")
    held = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    if held and not overwrite:
        raise InputError(f"--out {out} already holds {len(held)} file(s) ({', '.join(held[:4])}"
                         f"{', …' if len(held) > 4 else ''}); choose an empty or new folder, or pass --overwrite to "
                         "replace files of the same names (other files are left as they are).")


def _slug(text: str, n: int = 40) -> str:
    s = re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower()
    return s[:n] or "prompt"


# ---------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------
def _load(model_arg: str | None, text_encoder_path: str | None, ev: Events):
    model, encoder = _load_model(model_arg, text_encoder_path, ev)
    if ev.should_cancel():  # Ctrl-C while the model loaded: stop before any work
        raise Cancelled("Cancelled; nothing was written.")
    return model, encoder


def _load_model(model_arg: str | None, text_encoder_path: str | None, ev: Events):
    from .models import load_model, resolve_model
    from .text import load_text_encoder

    folder = resolve_model(model_arg)
    t0 = time.perf_counter()
    model = load_model(folder)
    te = model.spec.text_encoder
    kwargs: dict[str, Any] = {"path": text_encoder_path}
    if te.get("max_tokens"):
        kwargs["max_tokens"] = int(te["max_tokens"])
    if te.get("id") == "tiny-hash":
        kwargs["dim"] = int(te["dim"])
    encoder = load_text_encoder(te["id"], **kwargs)
    ev.log(f"Loaded model '{model.id}' ({model.parameter_count() / 1e6:.2f} M parameters, "
           f"grid {model.spec.grid.shape} at {model.spec.grid.spacing_mm} mm) and text encoder "
           f"'{encoder.encoder_id}' in {time.perf_counter() - t0:.1f} s.")
    return model, encoder


def _write_series(series, model, out: StagedOutput, fmt: str, prefix: str = "",
                  oracle=None) -> tuple[list[dict], str]:
    from .overlay import montage_png
    from .pipeline import read_series
    from .volume import Provenance, write_volume

    readings = read_series(oracle, series, model.spec.grid) if oracle is not None else [None] * len(series.prompts)
    outputs, labels = [], []
    for i, (prompt, vol, reading) in enumerate(zip(series.prompts, series.volumes, readings)):
        name = f"{prefix}{i:02d}_SYNTHETIC_{_slug(prompt)}.{fmt}"  # the name says it too: a copied file keeps it
        prov = Provenance(model.id, [prompt], series.seed, None, kind="generated",
                          extra={"steps": series.steps, "guidance": series.guidance, "share": series.share,
                                 "separation": series.separation, "series_prompts": list(series.prompts)})
        write_volume(vol, out.path(name), provenance=prov)
        outputs.append({"prompt": prompt, "path": str(out.final(name)),
                        **({"oracle_reading": reading} if reading is not None else {})})
        labels.append(_montage_label(prompt, reading))
    montage = f"{prefix}montage.png"
    montage_png(series.volumes, labels, out.path(montage))
    return outputs, str(out.final(montage))


def _montage_label(prompt: str, reading: dict | None) -> str:
    """A montage row's label: the prompt (shortened if need be), then the SYNTHETIC mark and the
    oracle's reading, which are never cut off."""
    tail = "  [SYNTHETIC]" + (f"  oracle: {reading['lesion_ml']:.1f} ml, {reading['diagnosis']}" if reading else "")
    return _fit_label(prompt, tail)


def _fit_label(text: str, tail: str) -> str:
    """``text`` shortened (with "…") so that ``text + tail`` fits the characters a montage draws."""
    room = MONTAGE_LABEL_CHARS - len(tail)
    return (text if len(text) <= room else text[:room - 1] + "…") + tail


def _oracle_fields(oracle) -> dict:
    if oracle is None:
        return {"oracle": None}
    return {"oracle": oracle.id,
            "oracle_note": f"each output's oracle_reading is the estimate by oracle '{oracle.id}' of its lesion "
                           "volume, lesion-load class and diagnosis (its validation is in its card, "
                           "Resources/Models/oracle-5mm/ORACLE_CARD.md for the bundled one), not ground truth"}


def _print_outputs(outputs: list[dict], indent: str = "  ") -> None:
    for o in outputs:
        rd = o.get("oracle_reading")
        txt = (f"oracle: {rd['lesion_ml']:.1f} ml lesions ({rd['lesion_load']}), {rd['diagnosis']}"
               if rd else o["path"])
        print(f"{indent}{o['prompt']}  {txt}", file=sys.stderr)


def cmd_generate(args: argparse.Namespace, ev: Events) -> dict:
    from .pipeline import generate_series
    from .text.prompts import unrecognised_prompt_warning

    prompts = args.prompt or []
    if not prompts:
        raise InputError("Give at least one --prompt.")
    check_out(args.out, overwrite=args.overwrite)
    model, encoder = _load(args.model, args.text_encoder_path, ev)
    oracle = _load_oracle(args.oracle, model, ev, purpose="reads each generated volume's lesion volume and diagnosis")
    warnings = [w for w in map(unrecognised_prompt_warning, prompts) if w is not None]
    for w in warnings:
        ev.warn(w)
    out = StagedOutput(Path(args.out), overwrite=args.overwrite)
    try:
        t0 = time.perf_counter()
        series = generate_series(model, encoder, prompts, seed=args.seed, steps=args.steps, guidance=args.guidance,
                                 share=args.share, separation=args.separation, device=args.device,
                                 precision=args.precision, on_event=ev.emit,
                                 should_cancel=ev.should_cancel)
        outputs, montage = _write_series(series, model, out, args.format, oracle=oracle)
        summary = {"kind": "generate", "synthetic": True, "model": model.id, "seed": series.seed,
                   "steps": series.steps, "guidance": series.guidance, "share": series.share,
                   "separation": series.separation, "device": series.device,
                   "outputs": outputs, "montage": montage, "timings_s": series.timings_s,
                   "total_s": round(time.perf_counter() - t0, 3), **_oracle_fields(oracle),
                   "warnings": warnings, "software": f"CounterfactualGen {__version__}"}
        (out.path("summary.json")).write_text(json.dumps(summary, indent=2))
        out.commit()
    except BaseException:
        out.abort()
        raise
    summary["summary"] = str(Path(args.out) / "summary.json")
    if not ev.json_mode:
        print(f"Generated {len(outputs)} volumes in {summary['total_s']} s. Wrote to {Path(args.out)}/ "
              f"(all marked SYNTHETIC), montage {montage}:", file=sys.stderr)
        _print_outputs(outputs)
    return summary


def cmd_demo(args: argparse.Namespace, ev: Events) -> dict:
    from .pipeline import generate_series

    check_out(args.out, overwrite=args.overwrite)
    model, encoder = _load(args.model, args.text_encoder_path, ev)
    card = model.spec.description or model.spec.name
    ev.log(f"Demo model: {model.id} — {card}")
    oracle = _load_oracle(args.oracle, model, ev, purpose="reads each generated volume's lesion volume and diagnosis")
    out = StagedOutput(Path(args.out), overwrite=args.overwrite)
    try:
        t0 = time.perf_counter()
        results = {}
        for key, prompts in (("lesion_load", LESION_SERIES), ("diagnosis", DIAGNOSIS_SERIES)):
            ev.log(f"Generating the {key.replace('_', ' ')} series ({len(prompts)} prompts, one shared noise)…")
            series = generate_series(model, encoder, prompts, seed=args.seed, steps=args.steps,
                                     guidance=args.guidance, share=args.share, separation=args.separation,
                                     device=args.device, precision=args.precision, on_event=ev.emit,
                                     should_cancel=ev.should_cancel)
            outputs, montage = _write_series(series, model, out, args.format, prefix=f"{key}_", oracle=oracle)
            results[key] = {"outputs": outputs, "montage": montage, "timings_s": series.timings_s,
                            "steps": series.steps, "guidance": series.guidance, "share": series.share,
                            "separation": series.separation}
        summary = {"kind": "demo", "synthetic": True, "model": model.id, "model_description": card,
                   "seed": args.seed, "series": results, "total_s": round(time.perf_counter() - t0, 2),
                   **_oracle_fields(oracle), "software": f"CounterfactualGen {__version__}"}
        out.path("summary.json").write_text(json.dumps(summary, indent=2))
        out.commit()
    except BaseException:
        out.abort()
        raise
    summary["summary"] = str(Path(args.out) / "summary.json")
    if not ev.json_mode:
        print(f"Demo done in {summary['total_s']} s. Wrote to {Path(args.out)}/ (all volumes marked SYNTHETIC):",
              file=sys.stderr)
        for key, r in results.items():
            print(f"  {key}: {len(r['outputs'])} volumes, montage {r['montage']}", file=sys.stderr)
            _print_outputs(r["outputs"], indent="    ")
    return summary


def _load_oracle(arg: str | None, model, ev: Events,
                 purpose: str = "reads lesion volumes before and after the edit"):
    """The oracle for an edit's before/after lesion volumes (or a generated series' readings):
    a folder, a registered oracle id, ``none``, or ``auto``.

    ``auto`` (default) uses the bundled oracle when it is installed and reads the model's
    contrast; otherwise the edit runs without one and says so.
    """
    from .evaluation.oracle import default_oracle_path, load_oracle, resolve_oracle

    if arg is not None and arg.lower() == "none":
        return None
    if arg is None or arg.lower() == "auto":
        if not (default_oracle_path() / "oracle.json").exists():
            ev.log("No bundled oracle installed: lesion volumes will not be reported.")
            return None
        oracle = load_oracle(default_oracle_path())
        if oracle.spec.contrast.upper() != model.spec.contrast.upper():
            ev.log(f"The bundled oracle reads {oracle.spec.contrast}, the model makes {model.spec.contrast}: "
                   "lesion volumes will not be reported (pass --oracle FOLDER).")
            return None
    else:
        oracle = load_oracle(resolve_oracle(arg))
    ev.log(f"Oracle '{oracle.id}' ({oracle.grid.spacing_mm} mm) {purpose}.")
    return oracle


def _preview_labels(input_name: str, target: str, report: dict) -> list[str]:
    """Row labels of an edit's preview.png: the scan, the SYNTHETIC counterfactual (the target prompt,
    shortened if need be), and the change labelmap's colours with its lesion ml."""
    def oracle_txt(when: str) -> str:
        ml = report.get(f"lesion_ml_{when}")
        return f"  oracle: {ml:.1f} ml, {report.get(f'diagnosis_{when}')}" if ml is not None else ""

    lesions = (f" +{report['lesion_ml_added']:.1f} ml" if report.get("lesion_ml_added") is not None else "",
               f" -{report['lesion_ml_removed']:.1f} ml" if report.get("lesion_ml_removed") is not None else "")
    return [f"scan: {input_name}{oracle_txt('before')}",
            _fit_label(f"[SYNTHETIC] counterfactual: {target}", oracle_txt("after")),
            f"change: lesion red{lesions[0]} / blue{lesions[1]}; yellow other (faint = small)"]


def _mask_for(scan, path: str, name: str, ev: Events):
    """A mask file as a boolean array on the scan's grid, resampled in world coordinates when it was
    stored on another grid (the log says so)."""
    from .geometry import mask_on_grid
    from .volume import read_volume

    vol = read_volume(path, validate=False, name=name)
    arr, resampled = mask_on_grid(vol, scan.shape, scan.affine_ras, name=name)
    if resampled:
        ev.log(f"The {name} is stored on another grid than the scan ({'×'.join(map(str, vol.shape))} voxels of "
               f"{' × '.join(f'{v:.3g}' for v in vol.spacing_mm)} mm): resampled onto the scan's grid in world "
               "coordinates (nearest neighbour).")
    return arr


def _edit_one(args: argparse.Namespace, ev: Events, model, encoder, input_path: Path, out: StagedOutput,
              prefix: str = "", oracle=None, scan=None) -> dict:
    from .overlay import edit_preview_png
    from .pipeline import edit_scan
    from .volume import Provenance, read_volume, sha256_file, write_volume

    if scan is None:
        scan = read_volume(input_path, max_voxels=args.max_voxels, name="input scan")
    src_hash = sha256_file(input_path)
    if scan.is_synthetic:
        ev.log("Note: the input is itself a SYNTHETIC volume made by CounterfactualGen.")
    brain = _mask_for(scan, args.mask, "brain mask", ev) if args.mask else None
    lesions = _mask_for(scan, args.lesion_mask, "lesion mask", ev) if args.lesion_mask else None
    res = edit_scan(model, encoder, scan, target_prompt=args.to, source_prompt=args.source, brain_mask=brain,
                    lesion_mask=lesions, strength=args.strength, steps=args.steps, guidance=args.guidance,
                    seed=args.seed, registration=args.registration, attention_keep=args.attention_keep,
                    null_text_iterations=args.null_text, edit_region=args.edit_region, direction=args.direction,
                    edit_word_weight=args.edit_word_weight, oracle=oracle, scan_name=input_path.name,
                    device=args.device,
                    precision=args.precision, on_event=ev.emit, should_cancel=ev.should_cancel)
    prompts = [res.report["prompts"]["from"], res.report["prompts"]["to"]]
    extra = {"strength": res.report["strength"], "steps": res.report["steps"], "guidance": res.report["guidance"],
             "source_file": input_path.name}
    fmt = args.format
    names = {"counterfactual": f"{prefix}counterfactual_SYNTHETIC.{fmt}", "difference": f"{prefix}difference.{fmt}",
             "change_labels": f"{prefix}change_labels.{fmt}"}
    in_dtype = scan.source_dtype if scan.source_dtype in ("uint8", "int8", "uint16", "int16", "int32", "uint32",
                                                          "float32", "float64") else "float32"
    codes = scan.nifti_codes  # the outputs lie on the scan's grid, in its space (scanner, aligned, MNI …)
    write_volume(res.counterfactual, out.path(names["counterfactual"]), dtype=in_dtype, nifti_codes=codes,
                 provenance=Provenance(model.id, prompts, args.seed, src_hash, kind="counterfactual", extra=extra))
    write_volume(res.difference, out.path(names["difference"]), nifti_codes=codes,
                 provenance=Provenance(model.id, prompts, args.seed, src_hash, kind="difference", extra=extra))
    write_volume(res.change_labels, out.path(names["change_labels"]), dtype="uint8", nifti_codes=codes,
                 provenance=Provenance(model.id, prompts, args.seed, src_hash, kind="change_labels",
                                       extra={**extra, "labels": {"1": "lesion added", "2": "lesion removed",
                                                                  "3": "other change"}}))
    names["preview"] = f"{prefix}preview.png"
    edit_preview_png(scan, res.counterfactual, res.change_labels, out.path(names["preview"]),
                     labels=_preview_labels(input_path.name, prompts[1], res.report))
    report = dict(res.report, input=str(input_path), input_sha256=src_hash)
    out.path(f"{prefix}report.json").write_text(json.dumps(report, indent=2))
    return {"kind": "edit", "synthetic": True, "input": str(input_path),
            **{k: str(out.final(v)) for k, v in names.items()}, "report": report,
            "report_path": str(out.final(f"{prefix}report.json")), "model": model.id,
            "prompts": {"from": prompts[0], "to": prompts[1]}, "seed": args.seed}


def _check_edit_paths(args: argparse.Namespace, inputs: Sequence[Path] = (), protect: Sequence[Path] = ()) -> None:
    """Refuse missing input files and an --out that cannot take the results before the model loads (seconds)."""
    from .volume import check_image_path

    for p in inputs:
        check_image_path(p, "input scan")
    if args.mask:
        check_image_path(args.mask, "brain mask")
    if args.lesion_mask:
        check_image_path(args.lesion_mask, "lesion mask")
    check_out(args.out, overwrite=args.overwrite, protect=[*inputs, *protect, args.mask, args.lesion_mask])


def cmd_edit(args: argparse.Namespace, ev: Events) -> dict:
    from .volume import read_volume

    inp = Path(args.input)
    _check_edit_paths(args, [inp])
    scan = read_volume(inp, max_voxels=args.max_voxels, name="input scan")  # a bad file fails before the model loads
    model, encoder = _load(args.model, args.text_encoder_path, ev)
    oracle = _load_oracle(args.oracle, model, ev)
    out = StagedOutput(Path(args.out), protect=[inp, args.mask, args.lesion_mask], overwrite=args.overwrite)
    try:
        summary = _edit_one(args, ev, model, encoder, inp, out, oracle=oracle, scan=scan)
        summary["software"] = f"CounterfactualGen {__version__}"
        out.path("summary.json").write_text(json.dumps(summary, indent=2))
        out.commit()
    except BaseException:
        out.abort()
        raise
    summary["summary"] = str(Path(args.out) / "summary.json")
    if not ev.json_mode:
        r = summary["report"]
        oracle_txt = (f"; oracle lesion ml {r['lesion_ml_before']} → {r['lesion_ml_after']}"
                      if r.get("lesion_ml_before") is not None else "")
        region = "the oracle's lesion segmentation" if r.get("lesion_mask") == "oracle" else "the mask"
        lesion_txt = (f"lesion +{r['lesion_ml_added']} / −{r['lesion_ml_removed']} ml"
                      if r.get("lesion_ml_added") is not None else "lesion ml not measured (no oracle)")
        size = ("" if r.get("changed_median_pct") is None else
                f" ({100 * (1 - r['unchanged_fraction_in_brain']):.0f} % of the brain, by a median {r['changed_median_pct']} % "
                "of its intensity range)")
        print(f"Edited '{inp.name}' → {Path(args.out)}/ (SYNTHETIC): changed {r['changed_ml']} ml{size}; {lesion_txt}{oracle_txt}; "
              + (f"lesions inpainted inside {region}." if r.get("method") == "inpainting"
                 else f"reconstruction PSNR {r['reconstruction_psnr_db']} dB."), file=sys.stderr)
    return summary


def _batch_inputs(src: Path) -> list[tuple[Path, dict[str, Path]]]:
    """The scans of a batch, each with its own masks: a manifest's optional ``brain_mask`` and
    ``lesion_mask`` columns (paths relative to the manifest's folder), none for a folder."""
    from .volume import NIFTI_SUFFIXES, NRRD_SUFFIXES

    def resolve(p: str) -> Path:
        return (src.parent / p) if not os.path.isabs(p) else Path(p)

    if src.is_dir():
        items = [(p, {}) for p in sorted(p for p in src.iterdir() if p.is_file() and not p.name.startswith(".")
                                         and p.name.lower().endswith(NIFTI_SUFFIXES + NRRD_SUFFIXES))]
    elif src.suffix.lower() == ".csv":
        import csv

        rows = list(csv.DictReader(src.open()))
        if not rows or "image" not in rows[0]:
            raise InputError(f"The manifest {src} needs an 'image' column.")
        items = [(resolve(r["image"]), {k: resolve(r[k]) for k in ("brain_mask", "lesion_mask") if (r.get(k) or "").strip()})
                 for r in rows]
    else:
        raise InputError(f"--input for batch must be a folder of NIfTI/NRRD files or a manifest CSV; got {src}.")
    if not items:
        raise InputError(f"No NIfTI or NRRD files found in {src}.")
    return items


_SCAN_SUFFIX = re.compile(r"(\.nii\.gz|\.nii|\.nrrd|\.nhdr)$", re.I)


def batch_folder_names(files: Sequence[Path]) -> list[str]:
    """One output folder name per scan, all different: the file name without its suffix; where two
    scans share it (sub-01/FLAIR.nii.gz, sub-02/FLAIR.nii.gz), their path below the folders they
    share, joined by ``_`` (sub-01_FLAIR); where even that is shared (a.nii and a.nii.gz), the suffix."""
    stems = [_SCAN_SUFFIX.sub("", f.name) for f in files]
    resolved = [f.resolve() for f in files]
    names = list(stems)
    for i, stem in enumerate(stems):
        same = [j for j, t in enumerate(stems) if t.lower() == stem.lower()]
        if len(same) == 1:
            continue
        common = Path(os.path.commonpath([str(resolved[j].parent) for j in same]))
        rel = resolved[i].parent.relative_to(common).parts
        names[i] = "_".join([*rel, stem])
    shared = [sum(n.lower() == name.lower() for n in names) > 1 for name in names]
    for i, name in enumerate(list(names)):
        suffix = _SCAN_SUFFIX.search(files[i].name)
        if shared[i] and suffix:
            names[i] = f"{name}_{suffix.group(1).lstrip('.').replace('.', '_').lower()}"
    if len({n.lower() for n in names}) < len(names):
        raise InputError("Two scans of the batch would write to the same output folder: "
                         + ", ".join(str(f) for f, n in zip(files, names) if [m.lower() for m in names].count(n.lower()) > 1))
    return names


def cmd_batch(args: argparse.Namespace, ev: Events) -> dict:
    items = _batch_inputs(Path(args.input))
    files = [f for f, _ in items]
    names = batch_folder_names(files)
    inputs = [p for f, m in items for p in (f, *m.values())]
    _check_edit_paths(args, protect=inputs)  # a bad scan in the batch fails alone, below
    if any(m for _, m in items) and (args.mask or args.lesion_mask):
        ev.log("The manifest names masks: a row's own mask replaces --mask / --lesion-mask for that scan.")
    model, encoder = _load(args.model, args.text_encoder_path, ev)
    oracle = _load_oracle(args.oracle, model, ev)
    results, failures = [], []
    for k, (f, masks) in enumerate(items):
        ev.emit({"event": "progress", "stage": "batch", "step": k, "total": len(files), "eta_s": None})
        sub = Path(args.out) / names[k]
        out = StagedOutput(sub, protect=inputs, overwrite=args.overwrite)
        row_args = argparse.Namespace(**vars(args))  # this scan's own masks, where the manifest names them
        if "brain_mask" in masks:
            row_args.mask = str(masks["brain_mask"])
        if "lesion_mask" in masks:
            row_args.lesion_mask = str(masks["lesion_mask"])
        try:
            r = _edit_one(row_args, ev, model, encoder, f, out, oracle=oracle)
            out.path("summary.json").write_text(json.dumps(r, indent=2))
            out.commit()
            results.append(r)
            ev.log(f"[{k + 1}/{len(files)}] {f.name}: done")
        except Cancelled:
            out.abort()
            raise
        except CounterfactualGenError as exc:  # one bad scan must not stop the batch
            out.abort()
            failures.append({"input": str(f), "error": str(exc)})
            ev.log(f"[{k + 1}/{len(files)}] {f.name}: FAILED: {exc}")
    ev.emit({"event": "progress", "stage": "batch", "step": len(files), "total": len(files), "eta_s": 0})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    summary = {"kind": "batch", "synthetic": True, "model": model.id, "done": len(results), "failed": failures,
               "outputs": results}
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))
    summary["summary"] = str(Path(args.out) / "summary.json")
    if failures:
        raise InputError(f"{len(failures)} of {len(files)} scans failed (see {summary['summary']}).")
    return summary


def cmd_info(args: argparse.Namespace, ev: Events) -> dict:
    if args.devices:
        from .pipeline import list_devices

        devices = list_devices()
        if args.json:
            print(json.dumps(devices))
        else:
            for d in devices:
                print(f"{d['id']:8s} {d['name']}" + (f" ({d['memory_gb']} GB)" if "memory_gb" in d else ""))
        return {"devices": devices}
    from .models import load_spec, registry, resolve_model

    if args.model is None and args.list:
        entries = registry()
        print(json.dumps(entries, indent=2) if args.json else "\n".join(f"{e['id']}: {e.get('name', '')}" for e in entries))
        return {"models": entries}
    folder = resolve_model(args.model)
    spec = load_spec(folder)
    if args.json:
        print(json.dumps(spec.to_dict(), indent=2))
    else:
        card = folder / "MODEL_CARD.md"
        if card.exists():
            print(card.read_text())
        else:
            print(json.dumps(spec.to_dict(), indent=2))
    return {"model": spec.id}


# ---------------------------------------------------------------------------------
# argument parsing and main
# ---------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, seed: int = 0) -> None:
    p.add_argument("--model", default=None, help="model folder or registered id (default: the bundled default)")
    p.add_argument("--seed", type=int, default=seed, help="random seed (same seed → same result on a device)")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    p.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (default: the model's)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto = bf16 on GPU when a bf16/fp32 parity check passes, else fp32")
    p.add_argument("--format", default="nii.gz", choices=["nii.gz", "nii", "nrrd"], help="output volume format")
    p.add_argument("--progress-json", action="store_true", help="print progress as JSON lines on stdout")
    p.add_argument("--overwrite", action="store_true",
                   help="write into a non-empty --out, replacing files of the same names (never an input)")


def _oracle_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--oracle", default="auto",
                   help="oracle folder or registered oracle id that reads each generated volume's lesion ml and "
                        "diagnosis (summary.json, montage); auto = the bundled one if installed, none = skip")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="counterfactualgen",
                                 description="Language-guided 3D counterfactual brain MRI. Every output is SYNTHETIC.")
    ap.add_argument("--version", action="version", version=f"CounterfactualGen {__version__}")
    sub = ap.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="synthesise a counterfactual series: one volume per prompt from one noise")
    g.add_argument("--prompt", action="append", help="a sentence; repeat for a series")
    g.add_argument("--out", required=True, help="output folder")
    _oracle_argument(g)
    add_text_encoder_argument(g)
    add_share_argument(g)
    _common(g)

    d = sub.add_parser("demo", help="lesion-load and CN/MCI/AD series with the bundled model")
    d.add_argument("--out", default="demo_out", help="output folder (default: demo_out)")
    _oracle_argument(d)
    add_text_encoder_argument(d)
    add_share_argument(d)
    _common(d)

    def _edit_args(e: argparse.ArgumentParser) -> None:
        e.add_argument("--to", required=True, help="target prompt, e.g. 'Subject has high lesion load.'")
        e.add_argument("--from", dest="source", default=None,
                       help="source prompt describing the scan (default: the oracle's reading of the scan on the "
                            "target's scale; with --oracle none, the opposite end of that scale)")
        e.add_argument("--mask", default=None, help="brain mask of the scan (default: the template's, carried back); a "
                                                    "mask on another grid is resampled onto the scan's in world coordinates")
        e.add_argument("--lesion-mask", default=None,
                       help="lesion mask of the scan (any grid in its world coordinates): lesion filling (--to 'no "
                            "lesions') regenerates only these voxels; without one it fills the oracle's lesion segmentation (--oracle none: by the text alone)")
        e.add_argument("--strength", type=float, default=None,
                       help="how far to invert towards noise, 0..1 (default: 0.6 for lesion-load prompts, 0.8 for "
                            "diagnosis prompts towards AD, 0.6 towards CN; Testing/Benchmarks/README.md)")
        e.add_argument("--registration", default="affine", choices=["affine", "none"],
                       help="affine (default) or none when the scan is already on the model's grid/world")
        e.add_argument("--attention-keep", type=float, default=0.8,
                       help="fraction of steps the target follows the source's cross-attention (prompt-to-prompt)")
        e.add_argument("--edit-word-weight", type=float, default=1.0, help="attention weight of the edited words")
        e.add_argument("--null-text", type=int, default=0, metavar="N",
                       help="null-text optimisation (PRISM): N Adam iterations per step so the guided source "
                            "branch retraces the inversion (0 = off; 10 is the paper's setting; slower)")
        e.add_argument("--edit-region", default="auto", choices=["auto", "brain", "prompt"],
                       help="where a lesion-load prompt edit may act: auto (default) = the white matter and 5 mm "
                            "around it, where MS lesions lie; brain = the whole brain; prompt = only where the "
                            "source and target prompts disagree (DiffEdit): much less change to healthy tissue, "
                            "fewer edits reach the target class (Testing/Benchmarks/bench_edit_region.py). "
                            "Other edits act on the whole brain")
        e.add_argument("--direction", default="auto", choices=["auto", "any"],
                       help="auto (default): a prompt edit keeps only the change in the direction its prompts "
                            "move the scan (adding lesions brightens a FLAIR scan, removing them darkens it; more "
                            "atrophy darkens), not the opposite change to healthy tissue; any = keep every change "
                            "(Testing/Benchmarks/bench_edit_region.py)")
        e.add_argument("--oracle", default="auto",
                       help="oracle folder or registered oracle id for lesion ml before/after; auto = the bundled one "
                            "if installed, none = skip")
        e.add_argument("--max-voxels", type=int, default=512**3, help="refuse larger inputs (default 512³)")
        add_text_encoder_argument(e)
        e.add_argument("--out", required=True, help="output folder")

    e = sub.add_parser("edit", help="counterfactual of a scan: --input scan --to 'prompt' --out DIR")
    e.add_argument("--input", required=True, help="the scan (NIfTI or NRRD); never modified")
    _edit_args(e)
    _common(e)

    b = sub.add_parser("batch", help="edit every scan of a folder (or manifest CSV) with the same prompt")
    b.add_argument("--input", required=True, help="folder of NIfTI/NRRD scans, or a manifest CSV with an 'image' column "
                                                  "(and optional 'brain_mask' / 'lesion_mask' columns: each scan's own masks)")
    _edit_args(b)
    _common(b)

    i = sub.add_parser("info", help="print a model card, the registered models, or the compute devices")
    i.add_argument("model", nargs="?", default=None, help="model folder or registered id")
    i.add_argument("--devices", action="store_true", help="list compute devices")
    i.add_argument("--list", action="store_true", help="list registered models")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    add_evaluate_parser(sub, _common)  # evaluate: see the block after COMMANDS
    return ap


COMMANDS: dict[str, Callable[[argparse.Namespace, Events], dict]] = {
    "generate": cmd_generate,
    "demo": cmd_demo,
    "info": cmd_info,
    "edit": cmd_edit,
    "batch": cmd_batch,
}

# --- evaluate: implemented in evaluation/report.py, registered here -----------------------
from .evaluation.report import (add_evaluate_parser, add_share_argument, add_text_encoder_argument,  # noqa: E402
                                cmd_evaluate)

COMMANDS["evaluate"] = cmd_evaluate


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    ev = Events(json_mode=bool(getattr(args, "progress_json", False)))

    def on_signal(signum, frame):  # stop between steps; the pipeline raises Cancelled
        if ev.cancel_requested:  # second signal: stop now
            raise KeyboardInterrupt
        ev.cancel_requested = True

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        result = COMMANDS[args.command](args, ev)
        if ev.json_mode and args.command != "info":
            ev.emit({"event": "done", "summary": result.get("summary")})
        return 0
    except KeyboardInterrupt:
        err: CounterfactualGenError = Cancelled("Cancelled; partial outputs were removed.")
        return _report(ev, err)
    except CounterfactualGenError as exc:
        return _report(ev, exc)
    except MemoryError:
        return _report(ev, ResourceError("Out of memory. Try --device cpu, fewer prompts or a smaller model."),
                       kind="OutOfMemory")
    except ImportError as exc:  # a package of the install is missing or broken: not a bug of ours
        name = getattr(exc, "name", None) or str(exc)
        return _report(ev, ResourceError(
            f"A Python package this command needs cannot be imported ({name}: {exc}). Install the dependencies: "
            "pip install 'counterfactualgen[all]' (in Slicer: the module's Setup section, Install dependencies)."),
            kind="MissingDependency")
    except Exception as exc:  # noqa: BLE001 — a bug: keep the traceback for the report
        if type(exc).__name__ == "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            return _report(ev, ResourceError("The GPU ran out of memory. Try --device cpu or fewer prompts."),
                           kind="OutOfMemory")
        traceback.print_exc()
        if ev.json_mode:
            ev.emit({"event": "error", "kind": "InternalError", "message": f"{type(exc).__name__}: {exc}"})
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def _report(ev: Events, exc: CounterfactualGenError, kind: str | None = None) -> int:
    kind = kind or type(exc).__name__
    if ev.json_mode:
        ev.emit({"event": "error", "kind": kind, "message": str(exc)})
    print(f"counterfactualgen: error: {exc}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
