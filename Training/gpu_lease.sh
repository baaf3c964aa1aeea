#!/usr/bin/env bash
# Train, evaluate and benchmark the 128³ model (Training/configs/wdm_128.json) on one GPU
# machine that has no network and no text-encoder weights: a rented or lent GPU.
#
# Prepare, where the package is installed:
#   python Training/embed_prompts.py --config Training/configs/wdm_128.json --out .gpu/prompts.safetensors
#   pip download --no-deps ... -d .whl monai==X nibabel==Y   (only what the GPU machine lacks)
# Then, on the GPU machine, from the repository root:
#   OUT=/somewhere MINUTES=4 bash Training/gpu_lease.sh [--set KEY=JSON ...]
#
# Writes to $OUT: model.tar.part-* (the model folder; cat the parts | tar x), run.tar
# (logs, sample montages, evaluation report), bench_generate.json. Each step that can
# overrun has its own time limit, so the trained model always comes back.
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
MINUTES=${MINUTES:-4}
EVAL_SEEDS=${EVAL_SEEDS:-24}
EVAL_TIMEOUT=${EVAL_TIMEOUT:-120}
BENCH_TIMEOUT=${BENCH_TIMEOUT:-60}
RUN=${RUN:-runs/wdm128}
TABLE=${TABLE:-.gpu/prompts.safetensors}
DEVICE=${DEVICE:-cuda}
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
mkdir -p "$OUT" "$(dirname "$RUN")"
start=$(date +%s)
python3 Training/train_diffusion.py --config Training/configs/wdm_128.json --out "$RUN" \
  --set max_minutes="$MINUTES" --set text_encoder="$TE" "$@" > "$RUN.train.log" 2>&1
train_rc=$?
tr '\r' '\n' < "$RUN.train.log" | grep -v '^\s*$' | tail -n 25
echo "train rc=$train_rc in $(( $(date +%s) - start )) s"
if [ -f "$RUN/model/model.json" ]; then
  tar -C "$RUN" -cf - model | split -b 15m - "$OUT/model.tar.part-"
fi
# Evaluation needs no SimpleITK (a 53 MB wheel that does not fit the transfer): it resamples with SciPy.
if [ -f "$RUN/model/model.json" ]; then
  start=$(date +%s)
  timeout "$EVAL_TIMEOUT" python3 -m CounterfactualGenLib.cli evaluate --model "$RUN/model" --out "$RUN/eval" \
    --seed 0 --seeds "$EVAL_SEEDS" --edits 0 --sweep none --reference 0 --twins 0 \
    --text-encoder-path "$TABLE" --device "$DEVICE" > "$RUN.eval.log" 2>&1
  echo "evaluate rc=$? in $(( $(date +%s) - start )) s"; tail -n 15 "$RUN.eval.log"
fi
if [ "$DEVICE" != cpu ]; then
  timeout "$BENCH_TIMEOUT" python3 Testing/Benchmarks/bench_generate.py --device "$DEVICE" --steps 30 --grids 128 \
    --size small --precision auto --json "$OUT/bench_generate.json" > "$RUN.bench.log" 2>&1
  echo "bench rc=$?"; tail -n 12 "$RUN.bench.log"
fi
tar -cf "$OUT/run.tar" --exclude='*.safetensors' --exclude='*.npz' "$RUN" "$RUN".*.log 2>/dev/null
ls -la "$OUT"
exit "$train_rc"
