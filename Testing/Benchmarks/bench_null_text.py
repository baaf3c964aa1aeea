"""Null-text optimisation (PRISM): reconstruction PSNR and time against iterations and learning rate.

Edits the bundled clinical sample (minimal → high lesion load) with a model, once
without null-text optimisation and once per (iterations, lr) setting, and prints the
source branch's reconstruction PSNR in the brain (model space) and the seconds taken.

    python Testing/Benchmarks/bench_null_text.py                      # bundled demo model, CPU
    python Testing/Benchmarks/bench_null_text.py --settings 10:0.01 10:0.1 20:0.1 --json nt.json
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from _bench import ROOT, load, parser


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__)
    ap.add_argument("--input", default=str(ROOT / "Resources" / "SampleData" / "longitudinal_patient04_study1_FLAIR.nii.gz"))
    ap.add_argument("--settings", nargs="+", default=["10:0.01", "10:0.03", "10:0.1", "20:0.01", "20:0.03", "20:0.1"],
                    help="ITERATIONS:LR pairs")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    import CounterfactualGenLib.sampling.editing as editing
    from CounterfactualGenLib.pipeline import edit_scan
    from CounterfactualGenLib.volume import read_volume

    model, encoder, _ = load(args)
    scan = read_volume(args.input)
    optimise = editing.optimise_null_text
    rows = []
    for setting in ["0:0"] + list(args.settings):
        iters, lr = int(setting.split(":")[0]), float(setting.split(":")[1])
        editing.optimise_null_text = lambda *a, _lr=lr, **k: optimise(*a, **{**k, "lr": _lr})
        t = time.perf_counter()
        r = edit_scan(model, encoder, scan, target_prompt="Subject has high lesion load.",
                      source_prompt="Subject has minimal lesion load.", null_text_iterations=iters,
                      device=args.device)
        nt = r.report["null_text"] or {}
        rows.append({"iterations": iters, "lr": lr if iters else None,
                     "psnr_db": r.report["reconstruction_psnr_db"],
                     "psnr_db_without": nt.get("reconstruction_psnr_db_without", r.report["reconstruction_psnr_db"]),
                     "null_text_s": r.report["timings_s"].get("null_text", 0.0),
                     "edit_s": round(time.perf_counter() - t, 2)})
        print(json.dumps(rows[-1]), flush=True)
    editing.optimise_null_text = optimise
    print(f"\nmodel {model.id}, input {Path(args.input).name}, device {r.report['device']}")
    print("| iterations | lr | reconstruction PSNR dB | without | null-text s | edit s |\n|---|---|---|---|---|---|")
    for w in rows:
        print(f"| {w['iterations']} | {w['lr'] or '—'} | {w['psnr_db']} | {w['psnr_db_without']} | "
              f"{w['null_text_s']:.1f} | {w['edit_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"model": model.id, "input": args.input, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
