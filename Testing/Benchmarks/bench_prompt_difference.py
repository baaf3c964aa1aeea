"""How much of a model's prompt difference another model keeps, one denoiser step at a time.

An edit lives on the difference between two prompts' predictions (amplified by guidance). For a student
fine-tuned from an anchor (e.g. ``anchor.background_invariance``), this compares, on held-out engine
subjects with the same noise and time, the velocity difference between two prompts (and between a prompt
and no prompt) inside the brain: the anchor sees each subject as its spec says (``intensity.outside_brain``),
each student as its own spec says. It prints ``||d_student|| / ||d_anchor||`` (1: the same size) and the
correlation of the two differences (1: the same pattern).

    python Testing/Benchmarks/bench_prompt_difference.py --threads 2 --students runs/bginv/run/model runs/bginv2/run/model
"""

from __future__ import annotations

import numpy as np

from _bench import load, parser

PAIRS = {"high − no lesions": ("Subject has high lesion load.", "Subject has no lesions."),
         "AD − CN": ("Subject has mild Alzheimer's dementia (AD).", "Subject is cognitively normal (CN)."),
         "high − no prompt": ("Subject has high lesion load.", None)}


def main(argv: list[str] | None = None) -> int:
    ap = parser(__doc__, subjects=12, seed=644)
    ap.add_argument("--students", nargs="+", required=True, help="model folders to compare with --model")
    ap.add_argument("--times", nargs="*", type=float, default=[0.3, 0.5, 0.7], help="rectified-flow times")
    args = ap.parse_args(argv)

    import torch

    from CounterfactualGenLib.evaluation.edits import held_out_pairs
    from CounterfactualGenLib.models import load_model, resolve_model
    from CounterfactualGenLib.pipeline import to_model_space
    from CounterfactualGenLib.sampling.samplers import rflow_training_target

    anchor, enc, _ = load(args)
    students = {s: load_model(resolve_model(s), text_encoder=enc) for s in args.students}
    prompts = sorted({p for ab in PAIRS.values() for p in ab if p})
    ctx = {p: enc.encode([p]).tokens for p in prompts}
    ctx[None] = enc.null(1).tokens
    grid = anchor.spec.grid
    res: dict[tuple[str, str], list[tuple[float, float]]] = {(s, k): [] for s in students for k in PAIRS}
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for subj, _ in held_out_pairs(grid, args.subjects, seed=args.seed):
            brain = subj.brain_mask > 0

            def inputs(m):
                ms = to_model_space(subj.image, grid, None, None, brain_mask=brain, registration="none",
                                    outside_brain=str(m.spec.intensity.get("outside_brain", "scan")))
                cell = torch.nn.functional.max_pool3d(torch.from_numpy(ms.brain_model)[None, None].float(), 2)[0, 0] > 0
                return m.encode(torch.from_numpy(ms.x_model)[None, None]), cell

            z_a, cell = inputs(anchor)
            z_s = {s: inputs(m)[0] for s, m in students.items()}
            for t in args.times:
                tt = torch.tensor([t])
                noise = torch.randn(z_a.shape, generator=gen)

                def predict(m, z):
                    x, _ = rflow_training_target(z, noise, tt)
                    return {p: m.denoiser(x, tt, c)[0][:, cell].flatten() for p, c in ctx.items()}

                pa = predict(anchor, z_a)
                for s, m in students.items():
                    ps = predict(m, z_s[s])
                    for k, (a, b) in PAIRS.items():
                        da, ds = pa[a] - pa[b], ps[a] - ps[b]
                        res[(s, k)].append((float(ds.norm() / da.norm()), float(torch.corrcoef(torch.stack([da, ds]))[0, 1])))
    print(f"{args.subjects} held-out subjects from seed {args.seed}, times {args.times}, one noise per subject and time; "
          f"the anchor {args.model or 'the default model'}")
    print("| student | difference | norm ratio student / anchor: mean (min … max) | correlation: mean |")
    print("|---|---|---|---|")
    for (s, k), v in res.items():
        a = np.array(v)
        print(f"| {s} | {k} | {a[:, 0].mean():.3f} ({a[:, 0].min():.3f} … {a[:, 0].max():.3f}) | {a[:, 1].mean():.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
