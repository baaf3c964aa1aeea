"""Where a model's lesion-load series miss their classes, from an evaluation's per-seed table.

Reads the ``report.json`` that ``counterfactualgen evaluate`` writes and prints, for each member
of the lesion-load series: the oracle's median lesion ml, and in how many seeds it came out
below its class (too faint) or above it (too strong). For the members that came out too faint it
asks whether the seed, not the class, made them faint: the median of the member before it in
the seeds where it missed against the others, and the correlation over the seeds of
log(ml + 0.1) of the two members.

    python Training/series_misses.py runs/probe_bundled_280/report.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ORDER = ("none", "minimal", "moderate", "high")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("report", help="report.json of counterfactualgen evaluate")
    args = ap.parse_args(argv)

    from CounterfactualGenLib.text.prompts import classify_prompt

    rows = json.loads(Path(args.report).read_text())["results"]["per_seed"]
    prompts = rows[0]["lesion"]["prompts"]
    classes = [classify_prompt(p).get("lesion_load") for p in prompts]
    ml = np.array([r["lesion"]["oracle_lesion_ml"] for r in rows], dtype=float)
    read = [[ORDER.index(c) for c in r["lesion"]["oracle_lesion_class"]] for r in rows]
    print(f"{len(rows)} seeds of {args.report}")
    print("| member | median ml | too faint | too strong | member before, median ml: where faint / elsewhere "
          "| log-correlation with it |")
    print("|---|---|---|---|---|---|")
    for j, cls in enumerate(classes):
        want = ORDER.index(cls)
        faint = np.array([r[j] < want for r in read])
        strong = np.array([r[j] > want for r in read])
        before = ""
        if j and faint.any() and (~faint).any():
            prev = ml[:, j - 1]
            corr = np.corrcoef(np.log(prev + 0.1), np.log(ml[:, j] + 0.1))[0, 1]
            before = f"{np.median(prev[faint]):.2f} / {np.median(prev[~faint]):.2f} | {corr:.2f}"
        else:
            before = " | "
        print(f"| {cls} | {np.median(ml[:, j]):.2f} | {int(faint.sum())} | {int(strong.sum())} | {before} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
