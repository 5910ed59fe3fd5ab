"""Side-by-side speed and memory: latent-dit vs diffusers' DiT / PixArt-α, same sizes, same inputs, same run.

    python scripts/benchmark_compare.py                       # CPU: DiT-S/2 and DiT-B/2 on 32×32×4 latents
    python scripts/benchmark_compare.py --presets DiT-XL/2 --latent-sizes 32 64 --dtype bf16   # a GPU
    python scripts/benchmark_compare.py --compile             # also torch.compile both sides (whole models)
    python scripts/benchmark_compare.py --compile blocks      # ... each transformer block (regional compilation)

Training step = forward + MSE loss + backward + AdamW step. Class-conditional latent-dit is compared with
`DiTTransformer2DModel`; text-conditioned latent-dit with `PixArtTransformer2DModel` (same depth, width,
heads, patch, text length and width). Sampling = 20 steps with guidance, batch 4, our pipeline vs
`PixArtAlphaPipeline` built with the same-size transformer, VAE, tokenizer and text encoder.
Runs are interleaved (A, B, C, A, B, C, ...) and repeated; medians and spreads are reported.
Each training step's model FLOPs are counted (latent_dit.flops: 3 × one forward's matmuls and attention) and
reported as TFLOP/s and MFU: against the datasheet's dense bf16 peak on a GPU, against this machine's measured
GEMM rate on a CPU.
Peak memory is measured per model, for training and for sampling, in a fresh subprocess: on CUDA
max_memory_allocated; on a CPU the process's peak resident size during two steps or two pipeline calls, less
its size once the models are built (Adam state, gradients, activations), twice: "live", with glibc handing
freed memory back at once, so it follows the tensors alive (what max_memory_allocated counts), and "kept",
with latent_dit.malloc's setting as the command line runs, which also counts freed memory kept for reuse.
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from latent_dit.config import ModelConfig, block_design
from latent_dit.flops import peak_flops, training_step_flops
from latent_dit.malloc import keep_freed_memory, peak_rss_bytes, reset_peak_rss
from latent_dit.model import PRESETS, LatentDiTTransformer2DModel

TEXT_LENGTH, TEXT_DIM = 77, 512  # CLIP ViT-B text states
# Our text model as `latent-dit train` builds it (PixArt-α's blocks), and with DiT's per-block adaLN regressors
# plus a LayerNorm before cross-attention (the text default until 2026-12-06; configs/emoji-default.yaml).
TEXT_BLOCKS = {"ours-text": block_design(ModelConfig(conditioning="text")),
               "ours-text-dit": dict(adaln_single=False, cross_attention_norm=True)}


KINDS = ("ours-class", "diffusers-dit", "ours-text", "diffusers-pixart")  # timed by default; build() also knows ours-text-dit
MODE_NAMES = {None: "eager", "model": "compiled", "blocks": "compiled blocks"}  # by --compile's value


def build(kind: str, preset: str, latent_size: int):
    """One of: ours-class, diffusers-dit, ours-text, ours-text-dit, diffusers-pixart — the same depth/width/heads/patch."""
    p = PRESETS[preset]
    heads, width = p["num_heads"], p["hidden_size"]
    common = dict(patch_size=p["patch_size"], in_channels=4)
    if kind == "ours-class":
        return LatentDiTTransformer2DModel(**p, conditioning="class", learn_sigma=True, sample_size=latent_size,
                                           **block_design(ModelConfig(conditioning="class")))
    if kind == "diffusers-dit":
        return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, num_layers=p["depth"],
                                     sample_size=latent_size, out_channels=8, **common)
    if kind in TEXT_BLOCKS:
        return LatentDiTTransformer2DModel(**p, conditioning="text", text_embed_dim=TEXT_DIM, sample_size=latent_size,
                                           **TEXT_BLOCKS[kind])
    if kind == "diffusers-pixart":
        return PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=width // heads, num_layers=p["depth"],
                                        sample_size=latent_size, out_channels=4, cross_attention_dim=width,
                                        caption_channels=TEXT_DIM, use_additional_conditions=False, **common)
    raise ValueError(kind)


def make_inputs(kind: str, batch: int, latent_size: int, device, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, latent_size, latent_size, generator=g).to(device, dtype)
    t = torch.randint(0, 1000, (batch,), generator=g).to(device)
    labels = torch.randint(0, 1000, (batch,), generator=g).to(device)
    text = torch.randn(batch, TEXT_LENGTH, TEXT_DIM, generator=g).to(device, dtype)
    mask = torch.ones(batch, TEXT_LENGTH, dtype=torch.long, device=device)
    mask[:, 20:] = 0  # realistic padding: 20 real tokens
    pooled = text[:, 0]
    kwargs = {
        "ours-class": dict(class_labels=labels),
        "diffusers-dit": dict(class_labels=labels),
        "ours-text": dict(encoder_hidden_states=text, encoder_attention_mask=mask, pooled_projections=pooled),
        "diffusers-pixart": dict(encoder_hidden_states=text, encoder_attention_mask=mask,
                                 added_cond_kwargs={"resolution": None, "aspect_ratio": None}),
    }["ours-text" if kind in TEXT_BLOCKS else kind]  # either block design takes the same inputs
    return x, t, kwargs


def compile_transformer(model, how: str):
    """torch.compile the whole model ("model"), or each transformer block ("blocks": regional compilation,
    diffusers' `compile_repeated_blocks`, which compiles one block's code and reuses it for the others; diffusers'
    DiT and PixArt-α name no repeated blocks, so theirs are named here). Returns what to call."""
    if how == "model":
        return torch.compile(model)
    if not getattr(model, "_repeated_blocks", None):
        model._repeated_blocks = ["BasicTransformerBlock"]
    model.compile_repeated_blocks()
    return model


def build_on(device, kind, preset, latent_size):
    """Build (and initialise) the model on `device` itself: seconds per XL/2 model on a GPU machine otherwise.
    Then `.to(device)` for what a model makes outside the device context (buffers from NumPy)."""
    with device:
        model = build(kind, preset, latent_size)
    return model.to(device)


class TrainStep:
    def __init__(self, kind, preset, latent_size, batch, device, dtype, compile_model: str | None):
        self.model = build_on(device, kind, preset, latent_size).train()
        # The same optimizer on both sides: fused AdamW, as latent-dit's trainer uses.
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=True)
        self.x, self.t, self.kwargs = make_inputs(kind, batch, latent_size, device, dtype)
        self.target = torch.randn_like(self.x)
        # Model FLOPs of one step, counted before compiling (compiling changes no model FLOPs).
        self.flops = training_step_flops(self.model, self.x, timestep=self.t, autocast_dtype=dtype, **self.kwargs)
        self.forward = compile_transformer(self.model, compile_model) if compile_model else self.model
        self.device, self.dtype = device, dtype

    def __call__(self):
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            out = self.forward(self.x, timestep=self.t, return_dict=False, **self.kwargs)[0]
            loss = torch.nn.functional.mse_loss(out[:, :4].float(), self.target.float())
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_interleaved(runners: dict, repeats: int, warmup: int, device) -> dict:
    for fn in runners.values():
        for _ in range(warmup):
            fn()
    sync(device)
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: summarize(values) for name, values in times.items()}


def summarize(values: list[float]) -> dict:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else [values[0]] * 3
    return {"median_s": statistics.median(values), "q1_s": q[0], "q3_s": q[2], "n": len(values)}


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_memory_child(task, kind, preset, latent_size, batch, device_name, dtype_name, runs) -> int:
    """Run in a fresh process: peak bytes `runs` training steps (task "train") or pipeline calls ("sampling")
    of `kind` need beyond what the built models occupy."""
    keep_freed_memory()  # as in main(): the same allocator for every model
    device, dtype = torch.device(device_name), getattr(torch, dtype_name)
    if task == "train":
        run = TrainStep(kind, preset, latent_size, batch, device, dtype, compile_model=None)
    else:
        run = sampling_runners(preset, latent_size, device, dtype, compile_model=None)[kind]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(runs):
            run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    base = rss_bytes()
    reset_peak_rss()  # the high-water mark from here, not the parent's (getrusage's would be inherited)
    for _ in range(runs):
        run()
    return peak_rss_bytes() - base


# glibc settings for a CPU memory child. "live": freed blocks go back to the OS at once, so the peak resident size
# follows the tensors alive (the CPU counterpart of CUDA's max_memory_allocated). "kept": latent_dit.malloc's
# setting, as the command line runs, so freed memory kept for reuse counts too.
ALLOCATORS = {"live": {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}, "kept": {}}


def peak_memory(kind, preset, latent_size, batch, device, dtype, task="train", allocator="live") -> int:
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import benchmark_compare as b; "
            f"print(b.peak_memory_child({task!r}, {kind!r}, {preset!r}, {latent_size}, {batch}, {device.type!r}, "
            f"{str(dtype).split('.')[-1]!r}, 2))")
    env = {**os.environ, **ALLOCATORS[allocator]}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    return int(out.stdout.strip().splitlines()[-1])


def measure_memory(kinds, preset, latent_size, batch, device, dtype, task) -> dict:
    """{"peak_memory_mb": {kind: MB}} (live), plus on a CPU "peak_rss_kept_mb" with the command line's allocator."""
    measure = {"peak_memory_mb": "live"} | ({"peak_rss_kept_mb": "kept"} if device.type == "cpu" else {})
    return {key: {kind: peak_memory(kind, preset, latent_size, batch, device, dtype, task, allocator) / 2**20 for kind in kinds}
            for key, allocator in measure.items()}


def memory_cell(entry, kind) -> str:
    if "peak_memory_mb" not in entry:
        return ""
    kept = entry.get("peak_rss_kept_mb", {}).get(kind)
    return f"{entry['peak_memory_mb'][kind]:.0f}" + ("" if kept is None else f" / {kept:.0f}")


def mfu_cell(entry, kind) -> str:
    rate = entry["tflop_per_step"][kind] / entry["timings"][kind]["median_s"]
    mfu = entry["mfu"][kind]
    return f"{rate:.3g}" + ("" if mfu is None else f" ({mfu:.1%})")


def tiny_text_parts(device):
    from latent_dit.tiny import make_tiny_text_encoder, make_tiny_tokenizer, make_tiny_vae
    import tempfile

    tokenizer = make_tiny_tokenizer(tempfile.mkdtemp())
    text_encoder = make_tiny_text_encoder(len(tokenizer), hidden_size=TEXT_DIM).to(device)
    return tokenizer, text_encoder, make_tiny_vae().to(device)


def sampling_runners(preset, latent_size, device, dtype, compile_model):
    """Our pipeline vs PixArtAlphaPipeline, same transformer size, VAE, tokenizer and text encoder."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from latent_dit.components import build_pipeline

    tokenizer, text_encoder, vae = tiny_text_parts(device)
    text_encoder, vae = text_encoder.to(dtype), vae.to(dtype)  # the whole pipeline in one dtype, as `pipe.to(dtype)`
    vae_factor = 2 ** (len(vae.config.block_out_channels) - 1)
    ours = build_pipeline(build_on(device, "ours-text", preset, latent_size).to(dtype), vae=vae, tokenizer=tokenizer,
                          text_encoder=text_encoder, scheduler=DPMSolverMultistepScheduler())
    theirs = PixArtAlphaPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                 transformer=build_on(device, "diffusers-pixart", preset, latent_size).to(dtype),
                                 scheduler=DPMSolverMultistepScheduler())
    for pipe in (ours, theirs):
        pipe.set_progress_bar_config(disable=True)
        if compile_model:
            pipe.transformer = compile_transformer(pipe.transformer, compile_model)
    size = latent_size * vae_factor
    prompts = ["a 3d rendered red apple emoji"] * 4
    common = dict(num_inference_steps=20, guidance_scale=4.5, height=size, width=size, output_type="latent")
    return {
        "ours-pipeline": lambda: ours(prompts, generator=torch.Generator().manual_seed(0), **common),
        "diffusers-pixart-pipeline": lambda: theirs(prompts, generator=torch.Generator().manual_seed(0),
                                                    clean_caption=False, max_sequence_length=TEXT_LENGTH,
                                                    use_resolution_binning=False, **common),
    }


def ratio(results, ours, theirs):
    return results[ours]["median_s"] / results[theirs]["median_s"]


def write_report(out: Path, report: dict, rows: list[str], device) -> str:
    """OUT.json and OUT.md with every result so far (rewritten after each, so a run cut short keeps them)."""
    out.with_suffix(".json").write_text(json.dumps(report, indent=1))
    memory = "peak MB (live / kept)" if device.type == "cpu" else "peak MB"
    table = (f"| task | preset | latent | mode | model | median ms (q1–q3) | {memory} | TFLOP/s (MFU) |\n"
             "| --- | --- | --- | --- | --- | --- | --- | --- |\n" + "\n".join(rows) + "\n")
    out.with_suffix(".md").write_text(f"Machine: {report['machine']}\n\nMFU peak: {report['machine']['peak_flops_source']}\n\n"
                                      + table)
    return table


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["DiT-S/2", "DiT-B/2"])
    parser.add_argument("--latent-sizes", nargs="+", type=int, default=[32])
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", nargs="?", const="model", choices=[mode for mode in MODE_NAMES if mode],
                        help="Also time torch.compile'd models: whole (`--compile`) or block by block (`--compile blocks`).")
    parser.add_argument("--dit-blocks", action="store_true",
                        help="Also time our text model with DiT's per-block adaLN and a norm before cross-attention.")
    parser.add_argument("--skip-sampling", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--out", default="benchmark-compare", help="Writes OUT.json and OUT.md.")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    torch.manual_seed(0)
    # Both sides run with glibc keeping freed memory, as latent-dit's command-line entry points do: otherwise
    # every step page-faults its activations back in, which cost both sides 25-35% here, by chance amounts.
    allocator = "glibc, freed memory kept (latent_dit.malloc)" if keep_freed_memory() else "default"
    peak, peak_source = peak_flops(device, dtype)

    rows, report = [], {"machine": {"device": torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or platform.machine(),
                                    "cpus": os.cpu_count(), "torch": torch.__version__,
                                    "diffusers": __import__("diffusers").__version__, "python": platform.python_version(),
                                    "allocator": allocator, "peak_flops": peak, "peak_flops_source": peak_source},
                        "args": vars(args), "results": []}
    modes = [None, args.compile] if args.compile else [None]
    out = Path(args.out)
    for preset in args.presets:
        for latent_size in args.latent_sizes:
            for compiled in modes if not args.skip_training else []:
                tag = MODE_NAMES[compiled]
                runners = {kind: TrainStep(kind, preset, latent_size, args.batch_size, device, dtype, compiled)
                           for kind in KINDS + (("ours-text-dit",) if args.dit_blocks else ())}
                results = time_interleaved(runners, args.repeats, args.warmup + (3 if compiled else 0), device)
                flops = {kind: runner.flops for kind, runner in runners.items()}
                del runners
                entry = {"task": "train-step", "preset": preset, "latent": latent_size, "mode": tag, "timings": results,
                         "tflop_per_step": {kind: f / 1e12 for kind, f in flops.items()},
                         "mfu": {kind: f / results[kind]["median_s"] / peak if peak else None for kind, f in flops.items()},
                         "ratio_class_vs_dit": ratio(results, "ours-class", "diffusers-dit"),
                         "ratio_text_vs_pixart": ratio(results, "ours-text", "diffusers-pixart")}
                if args.dit_blocks:
                    entry["ratio_text_dit_blocks_vs_pixart"] = ratio(results, "ours-text-dit", "diffusers-pixart")
                if not args.skip_memory and not compiled:
                    entry |= measure_memory(results, preset, latent_size, args.batch_size, device, dtype, "train")
                report["results"].append(entry)
                print(json.dumps(entry, indent=1))
                for kind, r in results.items():
                    rows.append(f"| train step | {preset} | {latent_size}² | {tag} | {kind} | {r['median_s'] * 1000:.1f} "
                                f"({r['q1_s'] * 1000:.1f}–{r['q3_s'] * 1000:.1f}) | {memory_cell(entry, kind)} | {mfu_cell(entry, kind)} |")
                variant = (f", ours with DiT's blocks/PixArt = {entry['ratio_text_dit_blocks_vs_pixart']:.2f}"
                          if args.dit_blocks else "")
                rows.append(f"| | | | | **ratio** ours/DiT = {entry['ratio_class_vs_dit']:.2f}, ours/PixArt = {entry['ratio_text_vs_pixart']:.2f}{variant} | | | |")
                write_report(out, report, rows, device)
            if not args.skip_sampling:
                for compiled in modes:
                    tag = MODE_NAMES[compiled]
                    with torch.no_grad():
                        results = time_interleaved(sampling_runners(preset, latent_size, device, dtype, compiled),
                                                   max(3, args.repeats // 3), 1, device)
                    entry = {"task": "sampling-20-steps-cfg-batch4", "preset": preset, "latent": latent_size, "mode": tag,
                             "timings": results, "ratio_vs_pixart_pipeline": ratio(results, "ours-pipeline", "diffusers-pixart-pipeline")}
                    if not args.skip_memory and not compiled:
                        entry |= measure_memory(results, preset, latent_size, 4, device, dtype, "sampling")
                    report["results"].append(entry)
                    print(json.dumps(entry, indent=1))
                    for kind, r in results.items():
                        rows.append(f"| sampling | {preset} | {latent_size}² | {tag} | {kind} | {r['median_s'] * 1000:.0f} "
                                    f"({r['q1_s'] * 1000:.0f}–{r['q3_s'] * 1000:.0f}) | {memory_cell(entry, kind)} | |")
                    rows.append(f"| | | | | **ratio** ours/PixArtAlphaPipeline = {entry['ratio_vs_pixart_pipeline']:.2f} | | | |")
                    write_report(out, report, rows, device)

    print(write_report(out, report, rows, device))


if __name__ == "__main__":
    main()
