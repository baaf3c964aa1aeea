#!/usr/bin/env bash
# Train several configs at once on one GPU machine (no network, no text-encoder weights),
# from one shared synthetic pool: small models (the 5 mm family) leave an H200 mostly idle,
# so a short lease trains them side by side, then reads each model on the probe seeds there
# (PROBE_SEEDS, default 40, from seed 200: `counterfactualgen evaluate` at guidance 4, shared
# steps 0.4, separation 1.5, no edits or twins; PROBE_SEEDS=0 skips it; PROBE_ARGS replaces
# those settings), so what comes back says which run is worth evaluating in full here.
#
# Prepare as for Training/gpu_lease.sh (.gpu/prompts.safetensors from Training/embed_prompts.py,
# missing wheels in .whl). Then, on the GPU machine, from the repository root:
#   OUT=/somewhere MINUTES=6 bash Training/gpu_lease_sweep.sh CONFIG.json [CONFIG.json ...] [-- --set KEY=JSON ...]
# The configs must share seed, grid and data.pool_size (the first run builds the pool; the
# others link it). Each run trains for MINUTES after its pool is ready.
#
# Writes to $OUT: runs.tar.part-* (every run's model folder, log.csv, sample montages,
# train log and probe report; no checkpoints or pools; cat the parts | tar x). Exit status:
# the number of runs that failed to train.
set -uo pipefail
: "${OUT:?set OUT to the folder that comes back}"
MINUTES=${MINUTES:-6}
RUNS=${RUNS:-runs/sweep}
TABLE=${TABLE:-.gpu/prompts.safetensors}
POOL_WAIT=${POOL_WAIT:-600}
PROBE_SEEDS=${PROBE_SEEDS:-40}
PROBE_ARGS=${PROBE_ARGS:---guidance 4 --share 0.4 --separation 1.5}
PROBE_TIMEOUT=${PROBE_TIMEOUT:-300}
DEVICE=${DEVICE:-auto}
configs=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do configs+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
[ ${#configs[@]} -gt 0 ] || { echo "usage: OUT=... bash Training/gpu_lease_sweep.sh CONFIG.json [...] [-- --set KEY=JSON ...]"; exit 2; }
source "$(dirname "${BASH_SOURCE[0]}")/gpu_env.sh"
mkdir -p "$OUT" "$RUNS"
start=$(date +%s)
launch() {  # config -> background training run in $RUNS/<config name>
  local cfg=$1 name; shift; name=$(basename "$cfg" .json)
  python3 Training/train_diffusion.py --config "$cfg" --out "$RUNS/$name" \
    --set max_minutes="$MINUTES" --set text_encoder="$TE" "$@" > "$RUNS/$name.train.log" 2>&1 &
  pids+=($!); names+=("$name")
}
pids=(); names=()
first=${configs[0]}
launch "$first" "$@"
first_dir="$RUNS/$(basename "$first" .json)"
# Wait for the first run's pool (written atomically), then link it into the other runs.
waited=0
while ! compgen -G "$first_dir/pool_*.npz" > /dev/null; do
  kill -0 "${pids[0]}" 2>/dev/null || { echo "the first run ended before its pool was ready:"; tail -n 20 "$first_dir.train.log"; break; }
  [ "$waited" -ge "$POOL_WAIT" ] && { echo "no pool after $POOL_WAIT s"; break; }
  sleep 1; waited=$((waited + 1))
done
echo "pool ready after $(( $(date +%s) - start )) s"
for cfg in "${configs[@]:1}"; do
  dir="$RUNS/$(basename "$cfg" .json)"; mkdir -p "$dir"
  for f in "$first_dir"/pool_*.npz; do [ -f "$f" ] && ln -f "$f" "$dir/"; done
  launch "$cfg" "$@"
done
failed=0
for i in "${!pids[@]}"; do
  wait "${pids[$i]}"; rc=$?
  [ "$rc" -ne 0 ] && failed=$((failed + 1))
  echo "== ${names[$i]}: rc=$rc"
  tr '\r' '\n' < "$RUNS/${names[$i]}.train.log" | grep -v '^\s*$' | tail -n 6
done
echo "all runs done in $(( $(date +%s) - start )) s"
if [ "$PROBE_SEEDS" -gt 0 ]; then  # every trained model read on the probe seeds, side by side
  probes=()
  for name in "${names[@]}"; do
    [ -f "$RUNS/$name/model/model.json" ] || continue
    # shellcheck disable=SC2086  # PROBE_ARGS is a list of options
    timeout "$PROBE_TIMEOUT" python3 -m CounterfactualGenLib.cli evaluate --model "$RUNS/$name/model" \
      --out "$RUNS/$name/probe" --seed 200 --seeds "$PROBE_SEEDS" --edits 0 --sweep none --reference 0 --twins 0 \
      $PROBE_ARGS --text-encoder-path "$TABLE" --device "$DEVICE" > "$RUNS/$name.probe.log" 2>&1 &
    probes+=("$!:$name")
  done
  for p in "${probes[@]}"; do
    wait "${p%%:*}"; echo "== probe ${p#*:}: rc=$?"; tail -n 1 "$RUNS/${p#*:}.probe.log"
  done
fi
tar -C "$(dirname "$RUNS")" -cf - --exclude='pool_*.npz' --exclude='ckpt' --exclude='tensorboard' "$(basename "$RUNS")" \
  | split -b 15m - "$OUT/runs.tar.part-"
ls -la "$OUT"
exit "$failed"
