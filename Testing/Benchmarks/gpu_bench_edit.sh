#!/usr/bin/env bash
# Edit times on a bare GPU machine in one call (Testing/Benchmarks/bench_edit.py, device cuda).
#
# Prepare here, once:
#   python Training/embed_prompts.py --config Training/configs/wdm_cpu_demo.json --canonical-only \
#       --out .gpu/canonical.safetensors
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       SimpleITK -d .whl-sitk        # 53 MB: the GPU machine has no SimpleITK, and registration needs it
# and run there with carry [".whl", ".whl-sitk", ".gpu"] (.gpu holding only canonical.safetensors: 58 MB in all):
#   OUT=$OUT bash Testing/Benchmarks/gpu_bench_edit.sh [bench_edit.py options, e.g. --precision fp32]
# It writes $OUT/bench_edit_<device>.json and .log. DEVICE (default cuda), REPEATS (default 5) and
# TABLE (default .gpu/canonical.safetensors) can be set; DEVICE=cpu runs the same steps here.
set -u
: "${OUT:?set OUT to the folder that comes back}"
DEVICE=${DEVICE:-cuda}
REPEATS=${REPEATS:-5}
TABLE=${TABLE:-.gpu/canonical.safetensors}
mkdir -p "$OUT"
source Training/gpu_env.sh
if ! python3 -c "import SimpleITK" 2>/dev/null; then
  ls .whl-sitk/*.whl >/dev/null 2>&1 || { echo "SimpleITK is missing and no wheel was carried in .whl-sitk/"; exit 1; }
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-sitk .whl-sitk/*.whl || exit 1
  export PYTHONPATH=/tmp/site-sitk:$PYTHONPATH
fi
tag=${DEVICE//:/}
python3 Testing/Benchmarks/bench_edit.py --device "$DEVICE" --repeats "$REPEATS" --text-encoder-path "$TABLE" \
  --json "$OUT/bench_edit_$tag.json" "$@" 2>&1 | tee "$OUT/bench_edit_$tag.log"
exit "${PIPESTATUS[0]}"
