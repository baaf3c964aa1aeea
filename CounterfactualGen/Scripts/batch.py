"""Headless batch edit: every volume in a folder -> counterfactuals, difference maps, change labels.

Usage (no window is opened; the layout manager and main window are never touched)::

    Slicer --no-splash --no-main-window --python-script CounterfactualGen/Scripts/batch.py \\
        --input DIR --to "Subject has high lesion load." --out DIR [--from "..."] \\
        [--model ID_OR_FOLDER] [--device auto|cpu|cuda:0] [--steps N] [--guidance G] \\
        [--seed 0] [--strength 0.6]

For each ``DIR/<name>.nrrd|.nii|.nii.gz|.nhdr|.mha|.mhd`` the outputs of the command line
(``counterfactual.nrrd``, ``difference.nrrd``, ``change_labels.nrrd``, ``preview.png``,
``summary.json``, all marked SYNTHETIC) go to ``OUT/<name>/`` and one line per scan to ``OUT/batch_summary.json``.

Exit codes: 0 all scans done, 1 some scans failed, 2 bad arguments / nothing to do,
130 interrupted.
"""

import argparse
import json
import os
import sys

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


class _ArgumentError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # never sys.exit from inside Slicer's interpreter mid-script
        raise _ArgumentError(message)


def parseArguments(argv):
    parser = _Parser(prog="batch.py", description="CounterfactualGen headless batch edit (run inside Slicer).")
    parser.add_argument("--input", required=True, help="folder of input volumes")
    parser.add_argument("--to", required=True, dest="target", help="target description")
    parser.add_argument("--from", default="", dest="source", help="source description (optional)")
    parser.add_argument("--out", required=True, help="output folder (created)")
    parser.add_argument("--model", default="", help="registry id or model folder (default: bundled model)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda:N")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance (default: the model's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strength", type=float, default=0.6)
    return parser.parse_args(argv)


def _stem(filename):
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def findVolumes(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(VOLUME_SUFFIXES) and os.path.isfile(os.path.join(folder, f)))


def _moduleLogic():
    # The module file sits one folder up (source tree and installed extension alike).
    moduleDir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if moduleDir not in sys.path:
        sys.path.insert(0, moduleDir)
    from CounterfactualGen import CounterfactualGenLogic

    return CounterfactualGenLogic()


def main(argv, logic=None, log=print):
    """Process every volume; returns the exit code (the caller passes it to sys.exit)."""
    try:
        args = parseArguments(argv)
    except _ArgumentError as exc:
        log(f"batch.py: error: {exc}")
        return EXIT_USAGE
    if not os.path.isdir(args.input):
        log(f"batch.py: error: input folder {args.input!r} does not exist")
        return EXIT_USAGE
    volumes = findVolumes(args.input)
    if not volumes:
        log(f"batch.py: error: no volumes ({', '.join(VOLUME_SUFFIXES)}) in {args.input!r}")
        return EXIT_USAGE

    import slicer

    logic = logic or _moduleLogic()
    os.makedirs(args.out, exist_ok=True)
    records, failures = [], 0
    for index, path in enumerate(volumes, 1):
        name = _stem(os.path.basename(path))
        outDir = os.path.join(args.out, name)
        log(f"[{index}/{len(volumes)}] {name}")
        record = {"input": path, "output_dir": outDir, "ok": False}
        inputNode, nodes = None, {}
        try:
            inputNode = slicer.util.loadVolume(path, {"show": False, "singleFile": True})
            if not inputNode:
                raise RuntimeError(f"Slicer could not read {path}")

            def progress(ev, _name=name):
                if ev.get("event") == "progress" and ev.get("step") == ev.get("total"):
                    log(f"  {_name}: {ev.get('stage')} done")
                elif ev.get("event") == "error":
                    log(f"  {_name}: {ev.get('kind')}: {ev.get('message')}")

            nodes = logic.editBlocking(inputNode, args.target, callback=progress, sourcePrompt=args.source,
                                       strength=args.strength, model=args.model, steps=args.steps,
                                       guidance=args.guidance, seed=args.seed, device=args.device, outputDir=outDir)
            record.update(ok=True, summary=os.path.join(outDir, "summary.json"),
                          nodes={role: node.GetName() for role, node in nodes.items()})
        except KeyboardInterrupt:
            log("batch.py: interrupted")
            return EXIT_INTERRUPTED
        except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the batch
            failures += 1
            record["error"] = str(exc)
            log(f"  FAILED: {exc}")
        finally:
            # Keep memory flat over long batches: outputs are on disk already.
            logic.removeNodes(list(nodes.values()) + ([inputNode] if inputNode else []))
        records.append(record)

    with open(os.path.join(args.out, "batch_summary.json"), "w", encoding="utf-8") as f:
        json.dump({"target": args.target, "source": args.source, "model": args.model, "seed": args.seed,
                   "steps": args.steps, "guidance": args.guidance, "results": records}, f, indent=2)
    log(f"batch.py: {len(volumes) - failures} done, {failures} failed; summary in "
        f"{os.path.join(args.out, 'batch_summary.json')}")
    return EXIT_OK if failures == 0 else EXIT_SOME_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
