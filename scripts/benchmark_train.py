"""Training throughput of a config, with and without the latent cache: images/s and peak memory.

    python scripts/benchmark_train.py --config tiny-cpu
    python scripts/benchmark_train.py --config dit-s2-256 --synthetic 64 --steps 10 \\
        --set components.vae=../shared/assets/taesd --set components.text_encoder=sentence-transformers/all-MiniLM-L6-v2

`--config` takes a name in configs/ or a path; `--set` overrides as for `latent-dit train`. Each mode runs
`latent_dit.train.main` in a fresh subprocess for `--warmup` + `--steps` optimizer steps (no validation,
no export); images/s counts only the steps after the warmup, from the per-step times in metrics.jsonl
(log_every=1, so each step ends with a host sync). Peak memory is per mode: torch.cuda.max_memory_allocated
on a GPU, the process's peak resident set size (getrusage) on CPU. The cached mode first builds the cache
with `latent-dit cache` in its own subprocess (its time is reported, not counted in images/s), so the
training process never holds the VAE or the text encoder. The bare mode times the model step alone
(noise, forward, loss, backward, clipping, AdamW) on the loop's own cached batches, collated beforehand and held
in memory, so cached / bare says whether the loop is input-bound (issue 6 asks for >= 95%); model FLOPs
(for MFU) are counted on the first of them. `--synthetic N` trains on N drawn images at
the config's resolution instead of data.source.

Processes on a shared VM run 10-20% apart from one another: `--repeats N` runs the modes N times, interleaved
(cached, bare, cached, ...), and reports each mode's median run (the lower middle one for an even N) with all
the runs' images/s; the cache is built once.

Writes <out>/benchmark.json and appends one markdown table row per mode to <out>/benchmark.md.
"""

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MODES = ("uncached", "cached", "bare")


def config_path(name: str) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    path = REPO / "configs" / f"{name.removesuffix('.yaml')}.yaml"
    if not path.is_file():
        sys.exit(f"error: no config {name!r} (neither a file nor configs/{name}.yaml)")
    return path


def write_synthetic_data(folder: Path, count: int, resolution: int) -> Path:
    """`count` drawn images (a coloured shape on white, at the training resolution) with captions."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(count):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = ("ellipse", "rectangle")[i % 2]
        image = Image.new("RGB", (resolution, resolution), "white")
        low, high = sorted(rng.integers(resolution // 8, resolution * 7 // 8, 2))
        getattr(ImageDraw.Draw(image), shape)([low, low, high, high], fill=color)
        image.save(folder / f"{i:05d}.png")
        rows.append({"file_name": f"{i:05d}.png", "text": f"a {shape} in rgb{color}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def run_overrides(args, mode: str, out: Path) -> list[str]:
    """The benchmark's own settings: a throwaway run folder, no validation or export, a loss log every step."""
    overrides = list(args.overrides) + [
        f"train.output_dir={out / mode}", f"train.max_steps={args.warmup + args.steps + 1}", "train.log_every=1",
        "train.validate_every=0", f"train.checkpoint_every={10**9}", "train.keep_checkpoints=1", "train.report_to=none",
    ]
    if args.synthetic:
        overrides.append(f"data.source={out / 'synthetic-data'}")
    return overrides + ([f"data.cache_dir={out / 'cache'}"] if mode in ("cached", "bare") else [])


def measure(args) -> dict:
    """Worker: train warmup + steps steps in this process and report throughput and peak memory."""
    import torch

    from latent_dit import train
    from latent_dit.config import load_config

    cfg = load_config(args.config, args.overrides)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # The run is thrown away: no checkpoint where it stops (11 GB at DiT-XL/2, written after the timed steps).
    train.save_checkpoint = lambda *args, **kwargs: None
    summary = train.main(cfg, stop_after=args.warmup + args.steps)  # stops before max_steps: no export
    times = [json.loads(line)["seconds"] for line in Path(cfg.train.output_dir, "metrics.jsonl").read_text().splitlines()]
    seconds = times[args.warmup + args.steps - 1] - times[args.warmup - 1]
    images = args.steps * cfg.train.batch_size * cfg.train.gradient_accumulation_steps * int(os.environ.get("WORLD_SIZE", 1))
    return {"images_per_second": round(images / seconds, 2), "seconds_per_step": round(seconds / args.steps, 4),
            "measured_steps": args.steps, "warmup_steps": args.warmup, **peak_memory(),
            "cached": summary["cached"], "data": summary["data"].splitlines()[0]}


def loop_batches(sampler, count: int) -> list[list[int]]:
    """The first `count` batches of dataset indices the training loop draws from `sampler` (epoch 0, then 1, ...)."""
    batches, epoch = [], 0
    while len(batches) < count:
        sampler.set_epoch(epoch)
        batches += list(sampler)
        epoch += 1
    return batches[:count]


def measure_bare(args) -> dict:
    """Worker: the model step alone -- noise, forward, loss, backward, clipping, AdamW -- on the batches the
    training loop draws (same sampler, seed and order), collated before the clock starts and held in memory: no
    data loader, EMA, LR schedule or logging. `cached` images/s over this rate says how much the rest of the
    loop costs (goal: >= 95%). (The same batches matter: a batch's longest caption sets the text length, and
    the dataset's first batch had 14 tokens where the loop's batches averaged 21.)"""
    import torch
    from accelerate import Accelerator

    from latent_dit import train
    from latent_dit.cache import CachedDataset, cache_fingerprint, collate_cached
    from latent_dit.config import load_config
    from latent_dit.data import BucketBatchSampler
    from latent_dit.flops import training_step_flops

    cfg = load_config(args.config, args.overrides)
    tc = cfg.train
    accelerator = Accelerator(mixed_precision=tc.mixed_precision)
    dataset, device = CachedDataset(cfg.data.cache_dir, cache_fingerprint(cfg)), accelerator.device
    indices = loop_batches(BucketBatchSampler(dataset.bucket_ids, tc.batch_size, seed=tc.seed), args.warmup + args.steps)
    # In host memory (pinned on a GPU), as the training loop's loader hands batches to `training_inputs`.
    batches = [{k: v.pin_memory() if torch.is_tensor(v) and device.type == "cuda" else v
                for k, v in collate_cached([dataset[i] for i in batch]).items()} for batch in indices]
    frozen, in_channels, scale_factor, text_dim = train.cached_parts(dataset, len(dataset.manifest["class_names"] or []))
    model = train.build_model(cfg, in_channels, cfg.data.resolution // scale_factor, text_dim, frozen["num_classes"]).to(device)
    objective = train.make_objective(cfg)
    sample = train.training_inputs(batches[0], frozen, objective, cfg, train.micro_step_generator(tc.seed, 0, 0, device))
    flops = training_step_flops(model, sample["noisy_latents"], sample["timesteps"], **sample["conditioning"],
                                autocast_dtype=train.autocast_dtype(tc.mixed_precision))
    optimizer = train.build_optimizer(model, tc)
    if tc.use_compile:  # as the training loop compiles it
        model.compile_repeated_blocks()
    model, optimizer = accelerator.prepare(model, optimizer)

    def step(i):
        generator = train.micro_step_generator(tc.seed, i, 0, device)
        inputs = train.training_inputs(batches[i], frozen, objective, cfg, generator)
        prediction = model(inputs["noisy_latents"], inputs["timesteps"], **inputs["conditioning"]).sample  # autocast by prepare
        loss = objective.loss(prediction, inputs["latents"], inputs["noise"], inputs["timesteps"])
        accelerator.backward(loss)
        if tc.max_grad_norm > 0:
            accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup):
        step(i).item()
    start = time.perf_counter()
    for i in range(args.steps):
        loss = step(args.warmup + i)
    loss.item()  # one host sync at the end, as the loop's loss log
    seconds = time.perf_counter() - start
    return {"images_per_second": round(args.steps * tc.batch_size / seconds, 2), "seconds_per_step": round(seconds / args.steps, 4),
            "measured_steps": args.steps, "warmup_steps": args.warmup, **peak_memory(), "cached": True,
            "data": "the loop's cached batches, resident",
            "model_flops_per_image": flops / tc.batch_size}


def add_mfu(results: dict, flops_per_image: float, mixed_precision: str) -> None:
    """Each mode's model-FLOPs utilisation: images/s × model FLOPs per image / the device's peak (latent_dit.flops)."""
    import torch

    from latent_dit.flops import peak_flops
    from latent_dit.train import autocast_dtype

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak, source = peak_flops(device, autocast_dtype(mixed_precision) or torch.float32)
    results["peak_flops"], results["peak_flops_source"] = peak, source
    for r in results["modes"].values():
        r["mfu"] = r["images_per_second"] * flops_per_image / peak if peak else None


def peak_memory() -> dict:
    import torch

    if torch.cuda.is_available():
        return {"peak_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1), "memory_kind": "torch.cuda.max_memory_allocated"}
    from latent_dit.malloc import peak_rss_bytes  # this process's own peak (getrusage's counts the parent's)

    kind = "peak RSS (VmHWM)" if sys.platform.startswith("linux") else "peak RSS (getrusage)"
    return {"peak_memory_mib": round(peak_rss_bytes() / 2**20, 1), "memory_kind": kind}


def machine() -> dict:
    import accelerate
    import diffusers
    import torch
    import transformers

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"
    return {"device": device, "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
            "accelerate": accelerate.__version__}


def runs_note(result: dict) -> str:
    rates = result.get("images_per_second_runs", [])
    return f" (runs: {', '.join(map(str, rates))})" if len(rates) > 1 else ""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="A config name in configs/ (e.g. tiny-cpu) or a YAML path.")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--steps", type=int, default=20, help="Measured optimizer steps per mode.")
    parser.add_argument("--warmup", type=int, default=3, help="Steps run first and not measured.")
    parser.add_argument("--synthetic", type=int, default=0, metavar="N", help="Train on N drawn images instead of data.source.")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--repeats", type=int, default=1,
                        help="Run the modes this many times, interleaved (A, B, A, B, ...); each reports its median run.")
    parser.add_argument("--out", default=None, help="Results folder (default: runs/benchmark/<config name>).")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1:
        sys.exit("error: --warmup and --steps must be at least 1")

    if args.worker:
        from latent_dit.malloc import keep_freed_memory

        keep_freed_memory()  # as `latent-dit train` does
        Path(args.result).write_text(json.dumps(measure_bare(args) if args.worker == "bare" else measure(args)))
        return

    from latent_dit.config import load_config

    path = config_path(args.config)
    out = Path(args.out or REPO / "runs" / "benchmark" / path.stem).resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfg = load_config(path, args.overrides)
    if args.synthetic:
        write_synthetic_data(out / "synthetic-data", args.synthetic, cfg.data.resolution)
    sizes = {key: getattr(cfg.model, key) for key in ("hidden_size", "depth", "num_heads", "patch_size") if getattr(cfg.model, key) is not None}
    model = cfg.model.preset + (" with " + ", ".join(f"{key}={value}" for key, value in sizes.items()) if sizes else "")
    results = {"config": str(path), "overrides": args.overrides, "synthetic_images": args.synthetic or None,
               "batch_size": cfg.train.batch_size, "resolution": cfg.data.resolution, "model": model,
               "machine": machine(), "modes": {}}
    runs = {mode: [] for mode in args.modes}
    for repeat in range(args.repeats):
        for mode in args.modes:
            overrides = run_overrides(args, mode, out)
            shutil.rmtree(out / mode, ignore_errors=True)  # a fresh run: metrics.jsonl is appended to
            result = {}
            if (mode == "cached" and repeat == 0) or (mode == "bare" and not (out / "cache" / "manifest.json").is_file()):
                shutil.rmtree(out / "cache", ignore_errors=True)  # time a full build
                start = time.time()
                cache = [sys.executable, "-m", "latent_dit.cli", "cache", "--config", str(path), *[f"--set={o}" for o in overrides]]
                subprocess.run(cache, check=True)
                result["cache_build_seconds"] = round(time.time() - start, 1)
            result_file = out / f"{mode}.json"
            worker = [sys.executable, __file__, "--config", str(path), "--worker", mode, "--result", str(result_file),
                      "--steps", str(args.steps), "--warmup", str(args.warmup), *[f"--set={o}" for o in overrides]]
            subprocess.run(worker, check=True)
            runs[mode].append({**json.loads(result_file.read_text()), **result})
    for mode, mode_runs in runs.items():  # the median run of each mode (this machine's noise is run to run)
        rates = [r["images_per_second"] for r in mode_runs]
        median = sorted(mode_runs, key=lambda r: r["images_per_second"])[(len(mode_runs) - 1) // 2]
        build = next((r["cache_build_seconds"] for r in mode_runs if "cache_build_seconds" in r), None)
        results["modes"][mode] = {**median, "images_per_second_runs": rates,
                                  **({"cache_build_seconds": build} if build is not None else {})}

    if "bare" in results["modes"]:  # model FLOPs per image, counted on the bare step's batch
        add_mfu(results, results["modes"]["bare"]["model_flops_per_image"], cfg.train.mixed_precision)
    if {"cached", "bare"} <= results["modes"].keys():
        results["cached_over_bare"] = round(results["modes"]["cached"]["images_per_second"] / results["modes"]["bare"]["images_per_second"], 3)
    (out / "benchmark.json").write_text(json.dumps(results, indent=2) + "\n")
    lines = []
    for mode, r in results["modes"].items():
        cache_note = f", cache built in {r['cache_build_seconds']} s" if "cache_build_seconds" in r else ""
        lines.append(f"| {path.stem} | {model} | {cfg.data.resolution} px | {mode} | {results['machine']['device']} | "
                     f"{cfg.train.batch_size} | {r['images_per_second']}{runs_note(r)} | {r['peak_memory_mib']:.0f} MiB ({r['memory_kind']}){cache_note} | "
                     + (f"{r['mfu']:.1%} |" if r.get("mfu") is not None else "|"))
    with (out / "benchmark.md").open("a") as f:
        f.write("\n".join(lines) + "\n")
    print("| config | model | size | mode | device | batch | images/s | peak memory | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(lines))
    if "cached_over_bare" in results:
        print(f"cached training runs at {results['cached_over_bare']:.1%} of the bare model step's images/s (goal: >= 95%)")
    print(f"wrote {out / 'benchmark.json'} and {out / 'benchmark.md'}")


if __name__ == "__main__":
    main()
