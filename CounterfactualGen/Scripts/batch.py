"""Headless batch edit: every volume in a folder -> counterfactuals, difference maps, change labels.

Usage (no window is opened; the layout manager and main window are never touched)::

    Slicer --no-splash --no-main-window --python-script CounterfactualGen/Scripts/batch.py \\
        --input DIR --to "Subject has high lesion load." --out DIR [--from "..."] \\
        [--model ID_OR_FOLDER] [--device auto|cpu|cuda:0] [--steps N] [--guidance G] \\
        [--seed 0] [--strength S] [--overwrite]

For each ``DIR/<name>.nrrd|.nii|.nii.gz|.nhdr|.mha|.mhd`` the outputs of the command line
(``counterfactual_SYNTHETIC.nrrd``, ``difference.nrrd``, ``change_labels.nrrd``, ``preview.png``,
``summary.json``, all marked SYNTHETIC) go to ``OUT/<name>/`` and one line per scan to ``OUT/batch_summary.json``.
Two inputs with the same name (``a.nii.gz`` and ``a.nrrd``) are refused before anything runs, and so is an
``OUT`` that already holds results of these names (a ``OUT/<name>/`` that is not empty, or
``OUT/batch_summary.json``) unless ``--overwrite`` is given. The command line's warnings (e.g. a scan
whose name names another contrast than the model's) are printed and kept in the summary.

Exit codes: 0 all scans done, 1 some scans failed, 2 bad arguments / nothing to do,
130 interrupted (Ctrl-C or SIGTERM: the running worker is stopped and its partial outputs removed).
"""

import argparse
import json
import os
import signal
import sys

VOLUME_SUFFIXES = (".nrrd", ".nhdr", ".nii", ".nii.gz", ".mha", ".mhd")
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
SUMMARY_NAME = "batch_summary.json"


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
    parser.add_argument("--strength", type=float, default=None,
                        help="how far to invert, 0..1 (default: 0.6 for lesion-load prompts, 0.8 for diagnosis towards AD, 0.6 towards CN)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into OUT/<name>/ folders that hold results already (their files are replaced)")
    return parser.parse_args(argv)


def _stem(filename):
    for suffix in sorted(VOLUME_SUFFIXES, key=len, reverse=True):
        if filename.lower().endswith(suffix):
            return filename[: -len(suffix)]
    return filename


def findVolumes(folder):
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(VOLUME_SUFFIXES) and os.path.isfile(os.path.join(folder, f)))


def duplicateNames(volumes):
    """Inputs whose output folders would be the same (same name without the extension; compared without case,
    as on Windows and macOS): [(name, [paths])]."""
    groups = {}
    for path in volumes:
        groups.setdefault(_stem(os.path.basename(path)).lower(), []).append(path)
    return [(_stem(os.path.basename(paths[0])), paths) for paths in groups.values() if len(paths) > 1]


def existingResults(volumes, out):
    """What a run into ``out`` would replace: non-empty OUT/<name>/ folders and OUT/batch_summary.json."""
    found = []
    for path in volumes:
        outDir = os.path.join(out, _stem(os.path.basename(path)))
        if os.path.isdir(outDir) and os.listdir(outDir):
            found.append(outDir)
        elif os.path.exists(outDir) and not os.path.isdir(outDir):
            found.append(outDir)
    if os.path.exists(os.path.join(out, SUMMARY_NAME)):
        found.append(os.path.join(out, SUMMARY_NAME))
    return found


def _moduleLogic():
    # The module file sits one folder up (source tree and installed extension alike).
    moduleDir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if moduleDir not in sys.path:
        sys.path.insert(0, moduleDir)
    from CounterfactualGen import CounterfactualGenLogic

    return CounterfactualGenLogic()


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the script is (the running worker is then stopped like for Ctrl-C)."""


def _onSigterm(signum, frame):
    raise _Terminated()


def _writeSummary(args, records, interrupted=False):
    data = {"target": args.target, "source": args.source, "model": args.model, "seed": args.seed,
            "steps": args.steps, "guidance": args.guidance, "results": records}
    if interrupted:
        data["interrupted"] = True
    with open(os.path.join(args.out, SUMMARY_NAME), "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)


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
    duplicates = duplicateNames(volumes)
    if duplicates:
        for name, paths in duplicates:
            log(f"batch.py: error: {' and '.join(repr(os.path.basename(p)) for p in paths)} would both write to "
                f"{os.path.join(args.out, name)!r}: rename all but one, or move them to another input folder")
        return EXIT_USAGE
    existing = existingResults(volumes, args.out)
    if existing and not args.overwrite:
        log(f"batch.py: error: {args.out!r} holds results already ({', '.join(repr(p) for p in existing[:3])}"
            f"{' ...' if len(existing) > 3 else ''}): choose another --out, or give --overwrite to replace them")
        return EXIT_USAGE

    import slicer

    logic = logic or _moduleLogic()
    os.makedirs(args.out, exist_ok=True)
    records, failures = [], 0
    oldHandler = None
    try:
        oldHandler = signal.signal(signal.SIGTERM, _onSigterm)  # (only in the main thread)
    except ValueError:
        oldHandler = None
    try:
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
                warnings = []

                def progress(ev, _name=name, _warnings=warnings):
                    if ev.get("event") == "progress" and ev.get("step") == ev.get("total"):
                        log(f"  {_name}: {ev.get('stage')} done")
                    elif ev.get("event") == "log" and ev.get("level") == "warning":
                        _warnings.append(str(ev.get("message", "")))
                        log(f"  {_name}: WARNING: {ev.get('message')}")
                    elif ev.get("event") == "error":
                        log(f"  {_name}: {ev.get('kind')}: {ev.get('message')}")

                nodes = logic.editBlocking(inputNode, args.target, callback=progress, sourcePrompt=args.source,
                                           strength=args.strength, model=args.model, steps=args.steps,
                                           guidance=args.guidance, seed=args.seed, device=args.device, outputDir=outDir)
                record.update(ok=True, summary=os.path.join(outDir, "summary.json"),
                              nodes={role: node.GetName() for role, node in nodes.items()})
                if warnings:
                    record["warnings"] = list(dict.fromkeys(warnings))
            except KeyboardInterrupt:
                raise
            except Exception as exc:  # noqa: BLE001 - one bad scan must not stop the batch
                failures += 1
                record["error"] = str(exc)
                log(f"  FAILED: {exc}")
            finally:
                # Keep memory flat over long batches: outputs are on disk already.
                logic.removeNodes(list(nodes.values()) + ([inputNode] if inputNode else []))
            records.append(record)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: editBlocking has stopped the worker and removed its folder
        log("batch.py: interrupted")
        _writeSummary(args, records, interrupted=True)
        return EXIT_INTERRUPTED
    finally:
        if oldHandler is not None:
            signal.signal(signal.SIGTERM, oldHandler)

    _writeSummary(args, records)
    log(f"batch.py: {len(volumes) - failures} done, {failures} failed; summary in "
        f"{os.path.join(args.out, SUMMARY_NAME)}")
    return EXIT_OK if failures == 0 else EXIT_SOME_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
