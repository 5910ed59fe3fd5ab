#!/usr/bin/env bash
# Issue 6's GPU figures in one `device` call. Once, in the checkout (../shared/GPU.md): download the .whl
# wheels (diffusers + datasets) and `cp -r ../shared/assets/taesd cache/taesd`; move checkpoints/ (70 MB) aside
# for the call, or the working tree is over the device's 64 MiB; then
#   run(command="bash scripts/gpu_benchmarks.sh", carry=[".whl", "cache/taesd"], timeout_s=580)
# 1-2. DiT-XL/2 bf16 training step vs diffusers' DiT / PixArt-α at 32² (batch 32) and 64² (batch 8) latents:
#      time, peak memory, model FLOPs and MFU (benchmark_compare.py).
# 3.   Sampling vs PixArtAlphaPipeline (20 steps, guidance, batch 4).
# 4.   The real training loop on cached latents vs the bare model step, with MFU (benchmark_train.py:
#      dit-xl2-256 on drawn 256-px images, TAESD latents, a random 512-wide CLIP text encoder).
# 5.   The training step again, compiled.
# $OUT gets log.txt (every table) and one JSON per part, as far as a part got before its time limit; copy them
# into docs/ and docs/benchmarks.md.
# PRESET, REPEATS, BATCH_32, BATCH_64, TRAIN_CONFIG and TRAIN_SETS shrink it for a dry run on a CPU:
#   PRESET=DiT-S/2 BATCH_32=2 BATCH_64=1 REPEATS=2 TRAIN_CONFIG=tiny-cpu OUT=/tmp/gpu bash scripts/gpu_benchmarks.sh
set -uo pipefail
OUT=${OUT:-runs/gpu-benchmarks}
PRESET=${PRESET:-DiT-XL/2}
REPEATS=${REPEATS:-10}
WORK=$(mktemp -d)
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=${PYTHONPATH:-$PWD} HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python3}
# Not installed (the GPU machine), `latent_dit.pipelines` (pyproject maps it to pipelines/) needs a link.
$PY -c "import latent_dit.pipelines" 2>/dev/null || ln -sfn ../pipelines latent_dit/pipelines
log() { tee -a "$OUT/log.txt"; }

$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')" 2>&1 | log
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null | log

bench() {  # name, seconds, benchmark_compare arguments...
  local name=$1 seconds=$2; shift 2
  echo "== $name: benchmark_compare $*" | log
  timeout "$seconds" $PY scripts/benchmark_compare.py --presets "$PRESET" --dtype bf16 --repeats "$REPEATS" \
    --out "$WORK/$name" "$@" > "$WORK/$name.out" 2>&1
  echo "exit $?" | log
  if [ -f "$WORK/$name.md" ]; then log < "$WORK/$name.md"; cp "$WORK/$name.json" "$OUT/"; else tail -n 5 "$WORK/$name.out" | log; cp "$WORK/$name.out" "$OUT/$name.out.txt"; fi
}
bench train-32-bf16 110 --latent-sizes 32 --batch-size "${BATCH_32:-32}" --warmup 3 --skip-sampling
bench train-64-bf16 110 --latent-sizes 64 --batch-size "${BATCH_64:-8}" --warmup 3 --skip-sampling
bench sampling-32-bf16 80 --latent-sizes 32 --warmup 1 --skip-training

echo "== train-loop: benchmark_train ${TRAIN_CONFIG:-dit-xl2-256}, cached vs bare" | log
VAE=cache/taesd; [ -d "$VAE" ] || VAE=../shared/assets/taesd
$PY -c "from latent_dit.tiny import make_tiny_text_encoder, make_tiny_tokenizer
tokenizer = make_tiny_tokenizer('$WORK/text'); make_tiny_text_encoder(len(tokenizer), hidden_size=512).save_pretrained('$WORK/text')"
timeout 150 $PY scripts/benchmark_train.py --config "${TRAIN_CONFIG:-dit-xl2-256}" --synthetic 512 --steps 10 --warmup 3 \
  --modes cached bare --out "$WORK/train-loop" --set "components.vae=$VAE" --set "components.text_encoder=$WORK/text" \
  --set data.num_workers=4 ${TRAIN_SETS:-} > "$WORK/train-loop.out" 2>&1
echo "exit $?" | log
tail -n 6 "$WORK/train-loop.out" | log
cp "$WORK/train-loop.out" "$OUT/train-loop.out.txt"  # the whole output: a worker's error sits above the tail
if [ -f "$WORK/train-loop/benchmark.json" ]; then cp "$WORK/train-loop/benchmark.json" "$OUT/train-loop.json"
else for mode in cached bare; do cp "$WORK/train-loop/$mode.json" "$OUT/train-loop-$mode.json" 2>/dev/null; done; fi  # cut short

# The last part (compiling four XL/2 models takes minutes) gets what is left of the call's 580 s.
LEFT=$(( ${BUDGET:-565} - SECONDS )); [ "$LEFT" -gt 60 ] || LEFT=60
bench train-32-bf16-compiled "$LEFT" --latent-sizes 32 --batch-size "${BATCH_32:-32}" --warmup 2 --skip-sampling \
  --skip-memory --compile
echo "== done" | log
