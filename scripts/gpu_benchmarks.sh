#!/usr/bin/env bash
# Issue 6's GPU figures in one `device` call (../shared/GPU.md: carry .whl with diffusers + datasets):
#   run(command="bash scripts/gpu_benchmarks.sh", carry=[".whl"], timeout_s=560)
# DiT-XL/2 bf16 training step vs diffusers' DiT / PixArt-α at 32² (batch 32) and 64² (batch 8) latents, with
# peak memory, model FLOPs and MFU; sampling vs PixArtAlphaPipeline; then the same compiled. Results go to
# $OUT (JSON + markdown per run, and log.txt); copy them into docs/ and docs/benchmarks.md.
# PRESET, REPEATS and BATCH_32 / BATCH_64 override the sizes, e.g. for a dry run on a CPU:
#   PRESET=DiT-S/2 BATCH_32=2 BATCH_64=1 REPEATS=2 OUT=/tmp/gpu bash scripts/gpu_benchmarks.sh
set -uo pipefail
OUT=${OUT:-runs/gpu-benchmarks}
PRESET=${PRESET:-DiT-XL/2}
REPEATS=${REPEATS:-10}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD}
PY=${PYTHON:-python3}
log() { tee -a "$OUT/log.txt"; }

$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | log
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null | log

bench() {  # name, seconds, arguments...
  local name=$1 seconds=$2; shift 2
  echo "== $name: benchmark_compare $*" | log
  timeout "$seconds" $PY scripts/benchmark_compare.py --presets "$PRESET" --dtype bf16 --repeats "$REPEATS" \
    --out "$OUT/$name" "$@" > "$OUT/$name.out" 2>&1
  echo "exit $?" | log
  if [ -f "$OUT/$name.md" ]; then log < "$OUT/$name.md"; else tail -n 5 "$OUT/$name.out" | log; fi
}
bench train-32-bf16 120 --latent-sizes 32 --batch-size "${BATCH_32:-32}" --warmup 3 --skip-sampling
bench train-64-bf16 120 --latent-sizes 64 --batch-size "${BATCH_64:-8}" --warmup 3 --skip-sampling
bench sampling-32-bf16 90 --latent-sizes 32 --warmup 1 --skip-training
bench train-32-bf16-compiled 200 --latent-sizes 32 --batch-size "${BATCH_32:-32}" --warmup 2 --skip-sampling \
  --skip-memory --compile
echo "== done" | log
