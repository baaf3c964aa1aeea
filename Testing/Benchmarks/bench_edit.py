"""Seconds per edit of a real scan, by edit path and stage, on a CPU or a GPU.

Edits the bundled sample FLAIR (320×320×48, 0.72×0.72×3 mm, with skull; or ``--input``) the way
``counterfactualgen edit`` does, registration included, along each path a user can take:

* ``add``: a prompt edit ("Subject has high lesion load."): partial inversion and
  regeneration with prompt-to-prompt attention control;
* ``add_null_text``: the same with PRISM null-text optimisation (``--null-text 10``);
* ``add_region``: the same confined to where the prompts disagree (``--edit-region prompt``);
* ``fill``: lesion filling without a mask: the oracle's segmentation inpainted (4 fills);
* ``fill_mask``: lesion filling with a given lesion mask (the voxels the ``fill`` edit
  removed, as a user's mask would be).

Every path runs once to warm up (CUDA context, cuDNN plans, SimpleITK), then ``--repeats``
times; the table gives the best and the median wall time of the ``edit_scan`` call and the
median time of each of its stages (``report["timings_s"]``; on a GPU stage boundaries are
asynchronous, so a stage's time may show up in the next one; the wall time is exact, as the
result comes back to the CPU). Reading the file is not timed. On a GPU the peak memory is
``torch.cuda.max_memory_allocated`` over the path.

    python Testing/Benchmarks/bench_edit.py --threads 2            # ≈3 min on 2 CPU cores
    python Testing/Benchmarks/bench_edit.py --device cuda --json edit-gpu.json
    # on a GPU machine without MiniLM: --text-encoder-path .gpu/prompts.safetensors
"""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path

from _bench import ROOT, parser

PATHS = ("add", "add_null_text", "add_region", "fill", "fill_mask")
HIGH = "Subject has high lesion load."
NONE = "Subject has no lesions."
#: edit_scan's stages in the order they run (the table's columns)
STAGES = ("register", "oracle", "encode", "edit_region", "invert", "null_text", "sample", "decode", "map_back")


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--input", default=str(ROOT / "Resources" / "SampleData" / "longitudinal_patient04_study1_FLAIR.nii.gz"),
                    help="the scan to edit (default: the bundled sample FLAIR)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per path after one warm-up")
    ap.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    ap.add_argument("--text-encoder-path", default=None,
                    help="text encoder folder or embedding table (Training/embed_prompts.py)")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")

    import torch

    from CounterfactualGenLib.cli import Events, _load
    from CounterfactualGenLib.evaluation.oracle import default_oracle_path, load_oracle
    from CounterfactualGenLib.pipeline import edit_scan
    from CounterfactualGenLib.volume import read_volume

    if args.threads:
        torch.set_num_threads(args.threads)
    model, encoder = _load(args.model, args.text_encoder_path, Events(json_mode=False, quiet=True))
    oracle = load_oracle(default_oracle_path())
    scan = read_volume(args.input, name="input scan")
    cuda = args.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    lesion_mask = None
    kwargs = {
        "add": {"target_prompt": HIGH},
        "add_null_text": {"target_prompt": HIGH, "null_text_iterations": 10},
        "add_region": {"target_prompt": HIGH, "edit_region": "prompt"},
        "fill": {"target_prompt": NONE},
        "fill_mask": {"target_prompt": NONE},
    }
    rows = []
    for path in args.paths:
        kw = dict(kwargs[path])
        if path == "fill_mask":
            if lesion_mask is None:  # the voxels an oracle fill removes: a mask as a user would give it
                r = edit_scan(model, encoder, scan, oracle=oracle, device=args.device, precision=args.precision,
                              target_prompt=NONE)
                lesion_mask = r.change_labels.array == 2
            if not lesion_mask.any():
                print("fill_mask: the oracle fill removed no voxels on this scan; skipped.")
                continue
            kw["lesion_mask"] = lesion_mask
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        walls, stages, report = [], [], None
        for rep in range(args.repeats + 1):
            sync()
            t0 = time.perf_counter()
            res = edit_scan(model, encoder, scan, oracle=oracle, device=args.device, precision=args.precision, **kw)
            sync()
            if rep:  # the first run warms up
                walls.append(time.perf_counter() - t0)
                stages.append(res.report["timings_s"])
            report = res.report
        med = {k: round(statistics.median(s.get(k, 0.0) for s in stages), 3) for k in stages[0]}
        rows.append({"path": path, "best_s": round(min(walls), 3), "median_s": round(statistics.median(walls), 3),
                     "stages_median_s": med, "method": report.get("method"),
                     "lesion_ml_before": report.get("lesion_ml_before"), "lesion_ml_after": report.get("lesion_ml_after"),
                     "peak_gpu_mb": round(torch.cuda.max_memory_allocated() / 2**20) if cuda else None})
        print(json.dumps(rows[-1]), flush=True)

    dev = torch.cuda.get_device_name(torch.device(args.device)) if cuda else \
        f"{platform.processor() or 'CPU'} ({torch.get_num_threads()} torch threads)"
    print(f"\nmodel {model.id}, scan {Path(args.input).name} {scan.shape}, device {args.device} ({dev}), "
          f"precision {args.precision}, torch {torch.__version__}, best / median of {args.repeats} after a warm-up")
    names = sorted({k for r in rows for k in r["stages_median_s"]},
                   key=lambda k: STAGES.index(k) if k in STAGES else len(STAGES))
    print("| path | best s | median s | " + " | ".join(names) + " | peak GPU MB |")
    print("|---|---|---|" + "---|" * len(names) + "---|")
    for r in rows:
        cells = " | ".join(str(r["stages_median_s"].get(k, "")) for k in names)
        print(f"| {r['path']} | {r['best_s']} | {r['median_s']} | {cells} | {r['peak_gpu_mb'] or ''} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.id, "input": str(args.input), "device": args.device,
                                               "device_name": dev, "precision": args.precision,
                                               "torch": torch.__version__, "repeats": args.repeats, "rows": rows},
                                              indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
