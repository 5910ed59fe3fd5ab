"""Where one training step's time goes: torch.profiler's top operators for a model of benchmark_compare.py.

    python scripts/profile_step.py --preset DiT-B/2 --kind ours-class --dtype bf16 --batch-size 4
    python scripts/profile_step.py --preset DiT-XL/2 --kind ours-class diffusers-dit --dtype bf16 --batch-size 32  # a GPU

The step is benchmark_compare's (forward + MSE + backward + fused AdamW, same inputs). After `--warmup` steps,
`--steps` steps are timed (median, with model TFLOP/s and MFU as benchmark_compare counts them), then as many
run under the profiler; the table lists the operators with the most self time on the device that does the
work (CUDA kernels on a GPU, CPU operators otherwise), summed over the profiled steps. On a GPU it also says
how busy the GPU was: kernel time over wall time. Well below 100% means the step waits for the CPU to launch
its kernels (eager mode's per-operator overhead), which compiling or larger batches cure; near 100% means
the kernels themselves are the cost. Writes OUT.md (default: runs/profile/<preset>-<kinds>.md).
"""

import argparse
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from benchmark_compare import KINDS, MODE_NAMES, TrainStep, sync, time_interleaved
from latent_dit.flops import peak_flops
from latent_dit.malloc import keep_freed_memory

REPO = Path(__file__).resolve().parent.parent


def profile_kind(kind, args, device, dtype, peak) -> str:
    step = TrainStep(kind, args.preset, args.latent_size, args.batch_size, device, dtype, args.compile)
    median_ms = time_interleaved({kind: step}, args.steps, args.warmup, device)[kind]["median_s"] * 1000
    rate = step.flops / median_ms / 1e9
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        sync(device)
        wall_ms = (time.perf_counter() - start) * 1000 / args.steps
    events = prof.key_averages()
    sort_by = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    lines = [f"### {kind}, {args.preset}, {args.latent_size}² latents, batch {args.batch_size}, {args.dtype}, "
             f"{MODE_NAMES[args.compile]}", "",
             f"step: {median_ms:.1f} ms (median of {args.steps}), {step.flops / 1e12:.3g} model TFLOP, {rate:.3g} TFLOP/s"
             + (f" = {rate * 1e12 / peak:.1%} MFU" if peak else "") + f"; {wall_ms:.1f} ms under the profiler"]
    if device.type == "cuda":
        busy_ms = sum(e.self_device_time_total for e in events) / 1000 / args.steps
        lines.append(f"GPU busy: {busy_ms:.1f} ms of kernels per step = {busy_ms / median_ms:.0%} of the step")
    lines += ["", "```", events.table(sort_by=sort_by, row_limit=args.rows, max_name_column_width=60), "```", ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-S/2")
    parser.add_argument("--kind", nargs="+", default=["ours-class"],
                        choices=KINDS + ("ours-text-dit",))
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--dtype", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--compile", nargs="?", const="model", choices=[mode for mode in MODE_NAMES if mode])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rows", type=int, default=25, help="Operators listed per model.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    keep_freed_memory()  # as benchmark_compare and the command line run: no page faults on reused activations
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    out = Path(args.out) if args.out else REPO / "runs" / "profile" / f"{args.preset.replace('/', '')}-{'-'.join(args.kind)}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    peak, peak_source = peak_flops(device, dtype)
    report = f"# Training-step profile ({name}, torch {torch.__version__}; MFU peak: {peak_source})\n\n"
    for kind in args.kind:
        torch.manual_seed(0)
        report += profile_kind(kind, args, device, dtype, peak) + "\n"
        out.write_text(report)  # after each model, so a run cut short keeps what it finished
    print(report)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
