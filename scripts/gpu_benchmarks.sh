#!/usr/bin/env bash
# Issue 6's GPU figures, in parts, run in the order given: `bash scripts/gpu_benchmarks.sh PART ...` (default: all)
#   profile   torch.profiler's top kernels of the XL/2 step, ours and DiT, and how busy the GPU is; our MFU at
#             batch 64 (profile_step.py)                                                        [limit 110 s]
#   loop      the real training loop on cached latents vs the bare model step, with MFU (benchmark_train.py:
#             dit-xl2-256 on drawn 256-px images, TAESD latents, a random 512-wide CLIP text encoder)   [150 s]
#   train32   DiT-XL/2 bf16 training step vs diffusers' DiT / PixArt-α, 32² latents, batch 32: time, peak
#             memory, model FLOPs and MFU (benchmark_compare.py)                                     [100 s]
#   train64   the same at 64² latents, batch 8                                                       [100 s]
#   sampling  our pipeline vs PixArtAlphaPipeline (20 steps, guidance, batch 4)                      [90 s]
#   compiled  the training step again, each transformer block torch.compile'd on both sides (compiling whole
#             XL/2 models took more than the rest of a call)       [what is left of BUDGET, default 465 s]
# Every call first prints the versions it runs with and checks that the training code imports (~20 s).
# Once, in the checkout (../shared/GPU.md): download the .whl wheels (diffusers + datasets) and
# `cp -r ../shared/assets/taesd cache/taesd`; move checkpoints/ (70 MB) aside for the calls, or the working tree is
# over the device's 64 MiB. 15 minutes of device time, starting the machine included, fit two calls, the
# never-measured parts first:
#   run(command="bash scripts/gpu_benchmarks.sh profile loop train32", carry=[".whl", "cache/taesd"], timeout_s=400)
#   run(command="BUDGET=330 bash scripts/gpu_benchmarks.sh compiled sampling", carry=[".whl", "cache/taesd"], timeout_s=350)
# $OUT gets log.txt (every table), one JSON or markdown file per part and the whole output of a part that
# failed, as far as a part got before its time limit; copy them into docs/ and docs/benchmarks.md.
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

# Versions first (the GPU machine's own torch, transformers, accelerate, pyarrow), then the training code's imports:
# datasets 5.2 needs pyarrow >= 24, and a failed import here explains a failed training part below.
$PY -c "import importlib.metadata as m, torch
print(*(f'{p} {m.version(p)}' for p in ('torch', 'diffusers', 'transformers', 'accelerate', 'datasets', 'pyarrow', 'safetensors')),
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu', sep=', ')" 2>&1 | log
$PY -c "import latent_dit.train, latent_dit.cache" 2>&1 | tail -n 3 | log
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv 2>/dev/null | log

bench() {  # name, seconds, benchmark_compare arguments...
  local name=$1 seconds=$2; shift 2
  echo "== $name: benchmark_compare $*" | log
  timeout "$seconds" $PY scripts/benchmark_compare.py --presets "$PRESET" --dtype bf16 --repeats "$REPEATS" \
    --out "$WORK/$name" "$@" > "$WORK/$name.out" 2>&1
  echo "exit $?" | log
  if [ -f "$WORK/$name.md" ]; then log < "$WORK/$name.md"; cp "$WORK/$name.json" "$OUT/"; else tail -n 5 "$WORK/$name.out" | log; cp "$WORK/$name.out" "$OUT/$name.out.txt"; fi
}
profile() {  # name, seconds, profile_step arguments...
  local name=$1 seconds=$2; shift 2
  echo "== $name: profile_step $*" | log
  timeout "$seconds" $PY scripts/profile_step.py --preset "$PRESET" --out "$OUT/$name.md" "$@" > "$WORK/$name.out" 2>&1
  echo "exit $?" | log
  grep -E "^(###|step:|GPU busy)" "$OUT/$name.md" 2>/dev/null | log || tail -n 5 "$WORK/$name.out" | log
}

part_train32() { bench train-32-bf16 100 --latent-sizes 32 --batch-size "${BATCH_32:-32}" --warmup 3 --skip-sampling; }
part_train64() { bench train-64-bf16 100 --latent-sizes 64 --batch-size "${BATCH_64:-8}" --warmup 3 --skip-sampling; }
part_sampling() { bench sampling-32-bf16 90 --latent-sizes 32 --warmup 1 --skip-training; }
part_profile() {  # where the XL/2 step's time goes; and our MFU at twice the batch (fixed costs shared by more images)
  profile profile-32 70 --kind ours-class diffusers-dit --batch-size "${BATCH_32:-32}"
  profile profile-32-batch64 40 --kind ours-class --batch-size $(( 2 * ${BATCH_32:-32} ))
}
part_loop() {
  echo "== train-loop: benchmark_train ${TRAIN_CONFIG:-dit-xl2-256}, cached vs bare" | log
  local vae=cache/taesd; [ -d "$vae" ] || vae=../shared/assets/taesd
  $PY -c "from latent_dit.tiny import make_tiny_text_encoder, make_tiny_tokenizer
tokenizer = make_tiny_tokenizer('$WORK/text'); make_tiny_text_encoder(len(tokenizer), hidden_size=512).save_pretrained('$WORK/text')"
  timeout 150 $PY scripts/benchmark_train.py --config "${TRAIN_CONFIG:-dit-xl2-256}" --synthetic 512 --steps 10 --warmup 3 \
    --modes cached bare --out "$WORK/train-loop" --set "components.vae=$vae" --set "components.text_encoder=$WORK/text" \
    --set data.num_workers=4 ${TRAIN_SETS:-} > "$WORK/train-loop.out" 2>&1
  echo "exit $?" | log
  tail -n 6 "$WORK/train-loop.out" | log
  cp "$WORK/train-loop.out" "$OUT/train-loop.out.txt"  # the whole output: a worker's error sits above the tail
  if [ -f "$WORK/train-loop/benchmark.json" ]; then cp "$WORK/train-loop/benchmark.json" "$OUT/train-loop.json"
  else for mode in cached bare; do cp "$WORK/train-loop/$mode.json" "$OUT/train-loop-$mode.json" 2>/dev/null; done; fi  # cut short
}
part_compiled() {  # compiling four XL/2 models' blocks: what is left of the call's BUDGET seconds
  local left=$(( ${BUDGET:-465} - SECONDS )); [ "$left" -gt 60 ] || left=60
  bench train-32-bf16-compiled "$left" --latent-sizes 32 --batch-size "${BATCH_32:-32}" --warmup 2 --skip-sampling \
    --skip-memory --compile blocks
}

for part in ${*:-profile loop train32 train64 sampling compiled}; do
  if declare -F "part_$part" > /dev/null; then "part_$part"; else echo "== unknown part: $part" | log; fi
done
echo "== done" | log
