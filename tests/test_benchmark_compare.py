"""scripts/benchmark_compare.py (issue 6): side by side with diffusers' DiT and PixArt-α, ratios, JSON + markdown,
and peak memory measured in each model's own process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT / "scripts"))
import benchmark_compare  # noqa: E402


def test_one_command_times_both_sides_and_writes_ratios(tmp_path):
    out = tmp_path / "bench"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "benchmark_compare.py"), "--presets", "DiT-S/2",
                    "--latent-sizes", "8", "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--skip-memory",
                    "--dit-blocks", "--out", str(out)], check=True, capture_output=True)
    report = json.loads(out.with_suffix(".json").read_text())
    assert report["machine"]["torch"] == torch.__version__
    train, sampling = report["results"]
    assert set(train["timings"]) == {"ours-class", "diffusers-dit", "ours-text", "ours-text-dit", "diffusers-pixart"}
    assert train["ratio_class_vs_dit"] == pytest.approx(
        train["timings"]["ours-class"]["median_s"] / train["timings"]["diffusers-dit"]["median_s"])
    peak = report["machine"]["peak_flops"]
    assert report["machine"]["peak_flops_source"].startswith("measured") and peak > 0  # CPU: this machine's GEMM rate
    for kind, timing in train["timings"].items():
        assert train["tflop_per_step"][kind] > 0
        assert train["mfu"][kind] == pytest.approx(train["tflop_per_step"][kind] * 1e12 / timing["median_s"] / peak)
    # the same preset and text length: both text models do nearly the same model FLOPs (PixArt's caption MLP differs)
    assert train["tflop_per_step"]["ours-text"] == pytest.approx(train["tflop_per_step"]["diffusers-pixart"], rel=0.1)
    assert set(sampling["timings"]) == {"ours-pipeline", "diffusers-pixart-pipeline"}
    assert sampling["ratio_vs_pixart_pipeline"] > 0
    table = out.with_suffix(".md").read_text()
    assert f"ours/DiT = {train['ratio_class_vs_dit']:.2f}" in table and f"({train['mfu']['ours-text']:.1%})" in table
    assert f"ours with DiT's blocks/PixArt = {train['ratio_text_dit_blocks_vs_pixart']:.2f}" in table
    assert f"ours/PixArtAlphaPipeline = {sampling['ratio_vs_pixart_pipeline']:.2f}" in table


def test_a_run_cut_short_keeps_the_results_it_finished(tmp_path, monkeypatch):
    """The GPU run has a hard time limit: each result is written as it comes, not only at the end."""
    def stopped(*args, **kwargs):
        raise KeyboardInterrupt  # as `timeout` stops the run while the sampling part builds its pipelines

    out = tmp_path / "bench"
    monkeypatch.setattr(benchmark_compare, "sampling_runners", stopped)
    # main() would set glibc to keep freed memory for the rest of this test process (test_malloc measures it)
    monkeypatch.setattr(benchmark_compare, "keep_freed_memory", lambda: False)
    monkeypatch.setattr(sys, "argv", ["benchmark_compare.py", "--presets", "DiT-S/2", "--latent-sizes", "8",
                                      "--batch-size", "1", "--repeats", "1", "--warmup", "0", "--skip-memory",
                                      "--out", str(out)])
    with pytest.raises(KeyboardInterrupt):
        benchmark_compare.main()
    report = json.loads(out.with_suffix(".json").read_text())
    assert [entry["task"] for entry in report["results"]] == ["train-step"]
    assert f"ours/DiT = {report['results'][0]['ratio_class_vs_dit']:.2f}" in out.with_suffix(".md").read_text()


def test_ours_are_the_models_latent_dit_train_builds():
    from latent_dit.config import ModelConfig, transformer_kwargs

    for kind, conditioning in (("ours-text", "text"), ("ours-class", "class")):
        built = benchmark_compare.build(kind, "DiT-S/2", 8).config
        default = transformer_kwargs(ModelConfig(conditioning=conditioning))
        assert {k: built[k] for k in ("adaln_single", "cross_attention_norm")} == {
            k: default[k] for k in ("adaln_single", "cross_attention_norm")}
    assert benchmark_compare.build("ours-text-dit", "DiT-S/2", 8).shared_modulation is None


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_benchmark_peak_memory_is_the_child_process_own():
    """benchmark_compare measures each model in a subprocess; getrusage's peak would include this process's
    resident memory at the fork (Linux keeps ru_maxrss across exec), which made all models look alike."""
    held = torch.ones(1500 * 2**18)  # this (parent) process holds 1.5 GiB of float32
    tiny = benchmark_compare.peak_memory("ours-class", "DiT-S/2", 8, 1, torch.device("cpu"), torch.float32)
    larger = benchmark_compare.peak_memory("ours-class", "DiT-S/2", 32, 4, torch.device("cpu"), torch.float32)
    del held
    assert 0 < tiny < 1000 * 2**20  # optimizer state + grads of 33 M parameters (~400 MB), not the parent's 1.5 GiB
    assert larger > tiny + 50 * 2**20  # 16× the tokens and 4× the batch: the activations show


def test_compile_blocks_compiles_each_transformer_block_on_both_sides():
    """`--compile blocks` (the GPU run's compiled part): regional compilation of ours and of diffusers' models,
    which name no repeated blocks themselves. Compiling is lazy: nothing compiles until a step runs."""
    for kind in ("ours-class", "diffusers-dit", "ours-text", "diffusers-pixart"):
        model = benchmark_compare.build(kind, "DiT-S/2", 8)
        assert benchmark_compare.compile_transformer(model, "blocks") is model
        blocks = model.blocks if kind.startswith("ours") else model.transformer_blocks
        assert len(blocks) == 12 and all(block._compiled_call_impl is not None for block in blocks), kind
        assert model._compiled_call_impl is None  # the model itself runs eager, between its blocks


def test_profile_step_lists_the_top_operators_of_each_model(tmp_path):
    out = tmp_path / "profile.md"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "profile_step.py"), "--preset", "DiT-S/2",
                    "--kind", "ours-class", "diffusers-dit", "--latent-size", "8", "--batch-size", "1", "--warmup", "1",
                    "--steps", "1", "--rows", "10", "--out", str(out)], check=True, capture_output=True)
    report = out.read_text()
    assert report.count("### ") == 2 and "### ours-class, DiT-S/2, 8² latents, batch 1, bf16, eager" in report
    assert report.count("step: ") == 2 and "Self CPU" in report
    assert "aten::mm" in report or "aten::addmm" in report  # the GEMMs, by name


def test_count_traffic_counts_per_image_and_fixed_bytes_as_a_gpu_would_run(tmp_path):
    out = tmp_path / "traffic.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "count_traffic.py"), "--preset", "DiT-S/2",
                    "--kind", "ours-class", "diffusers-dit", "--latent-size", "8", "--out", str(out)],
                   check=True, capture_output=True)
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"ours-class", "diffusers-dit"}
    assert all(r["traffic_per_image"] > 0 and r["traffic_fixed"] > 0 and r["saved_per_image"] > 0 for r in results.values())
    assert results["ours-class"]["traffic_per_image"] < results["diffusers-dit"]["traffic_per_image"]

    # Under CUDA's layer_norm policy (emulated in a fresh process: it is process-wide), plain nn.LayerNorm norms
    # return float32 and move more bytes than the model's own, which run outside autocast on the bf16 stream.
    code = f"""
import json, sys, torch
sys.path.insert(0, {str(REPO_ROOT / "scripts")!r})
import count_traffic
from latent_dit import model
library = count_traffic.run_as_on_a_gpu()
with torch.autocast("cpu", dtype=torch.bfloat16):
    upcast = model.LayerNorm(8)(torch.ones(2, 8, dtype=torch.bfloat16)).dtype, torch.nn.LayerNorm(8)(torch.ones(2, 8, dtype=torch.bfloat16)).dtype
ours = count_traffic.count_step("ours-class", "DiT-S/2", 8, 2)
model.LayerNorm.forward = torch.nn.LayerNorm.forward
print(json.dumps([str(upcast), ours, count_traffic.count_step("ours-class", "DiT-S/2", 8, 2)]))
"""
    dtypes, ours, plain = json.loads(subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                                                    text=True).stdout.splitlines()[-1])
    assert dtypes == "(torch.bfloat16, torch.float32)"
    assert ours[0] < plain[0] and ours[1] < plain[1]  # bytes moved, bytes saved for backward
