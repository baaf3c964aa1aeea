# Sourced by Training/gpu_lease.sh and Training/gpu_lease_sweep.sh: makes a bare GPU machine
# (no network, no text-encoder weights) ready to train, from the repository root.
# Installs the carried wheels (.whl) where monai or nibabel is missing, puts the repository on
# PYTHONPATH, prints the versions and the GPU, checks the embedding table $TABLE and sets TE,
# the text-encoder config that replays it.
export PYTHONUNBUFFERED=1
if ! python3 -c "import monai, nibabel" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
python3 -c "import torch, monai; print('torch', torch.__version__, 'monai', monai.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())"
[ -f "$TABLE" ] || { echo "No embedding table at $TABLE (Training/embed_prompts.py)"; exit 1; }
TE="{\"id\": \"minilm-l6-v2\", \"max_tokens\": 24, \"path\": \"$TABLE\"}"
