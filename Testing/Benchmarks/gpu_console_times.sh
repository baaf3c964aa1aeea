#!/usr/bin/env bash
# What a user waits for at the console, on a bare GPU machine in one call: the demo's wall time
# (`counterfactualgen demo`, process start and model loading included; the registry's expected
# time) and edit times by path and stage (Testing/Benchmarks/bench_edit.py).
#
# Prepare here, once:
#   python Training/embed_prompts.py --config Training/configs/wdm_cpu_demo.json --canonical-only \
#       --out .gpu/canonical.safetensors
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       SimpleITK -d .whl-sitk        # 53 MB: the GPU machine has no SimpleITK, and registration needs it
# and run there with carry [".whl", ".whl-sitk", ".gpu"] (.gpu holding only canonical.safetensors: 58 MB in all):
#   OUT=$OUT bash Testing/Benchmarks/gpu_console_times.sh [bench_edit.py options, e.g. --precision fp32]
# It writes $OUT/demo_<device>.txt (the demo's wall time, twice: the first run also warms caches) and
# $OUT/bench_edit_<device>.json and .log. DEVICE (default cuda), REPEATS (default 5), DEMO_ARGS and
# TABLE (default .gpu/canonical.safetensors) can be set; DEVICE=cpu runs the same steps here.
set -u
: "${OUT:?set OUT to the folder that comes back}"
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-5}
DEMO_ARGS=${DEMO_ARGS:-}
TABLE=${TABLE:-.gpu/canonical.safetensors}
mkdir -p "$OUT"
source Training/gpu_env.sh
if ! python3 -c "import SimpleITK" 2>/dev/null; then
  ls .whl-sitk/*.whl >/dev/null 2>&1 || { echo "SimpleITK is missing and no wheel was carried in .whl-sitk/"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-sitk .whl-sitk/*.whl || exit 1
  export PYTHONPATH=/tmp/site-sitk:$PYTHONPATH
fi
tag=${DEVICE//:/}
scratch=$(mktemp -d)
for run in 1 2; do
  t0=$(date +%s.%N)
  # shellcheck disable=SC2086  # DEMO_ARGS is a list of options
  python3 -m CounterfactualGenLib.cli demo --device "$DEVICE" --text-encoder-path "$TABLE" --out "$scratch/demo_$run" \
    $DEMO_ARGS > "$scratch/demo_$run.log" 2>&1 || { echo "demo failed:"; tail -n 20 "$scratch/demo_$run.log"; exit 1; }
  echo "demo run $run: $(python3 -c "print(round($(date +%s.%N) - $t0, 2))") s wall" | tee -a "$OUT/demo_$tag.txt"
done
rm -rf "$scratch"
python3 Testing/Benchmarks/bench_edit.py --device "$DEVICE" --repeats "$REPEATS" --text-encoder-path "$TABLE" \
  --json "$OUT/bench_edit_$tag.json" "$@" 2>&1 | tee "$OUT/bench_edit_$tag.log"
exit "${PIPESTATUS[0]}"
