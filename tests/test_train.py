"""Tests for latent_dit.train: each data layout trains end to end into a loadable pipeline, the loss falls
when overfitting for every objective, resume (and a SIGTERM stop) reproduces the uninterrupted run, and
bad data is counted while an unusable folder fails before any model loads.

Everything runs on CPU with tiny components saved to a temporary folder (see training_helpers.py).
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import latent_dit  # noqa: F401  (registers the pipeline with diffusers)
from latent_dit import cli, train
from latent_dit.data import DataError
from training_helpers import (
    make_class_folders,
    make_components,
    make_imagefolder,
    make_saved_dataset,
    make_sidecar_folder,
    REPO_ROOT,
    read_metrics,
    subprocess_env,
    tiny_config,
    write_config,
    tiny_tree,
)


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> dict:
    return make_components(tmp_path_factory.mktemp("components"))




def record_batches(monkeypatch) -> list[list[int]]:
    """Record the dataset indices of every micro-step's batch."""
    seen, original = [], train.training_inputs

    def recording(batch, *args, **kwargs):
        seen.append(batch["index"].tolist())
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(train, "training_inputs", recording)
    return seen


def ema_weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(Path(output_dir, "pipeline", "transformer", "diffusion_pytorch_model.safetensors"))


# ---------------------------------------------------------------- end to end, each layout


LAYOUTS = {
    "metadata.jsonl": (lambda folder: make_imagefolder(folder, metadata="jsonl"), "imagefolder, metadata.jsonl"),
    "metadata.csv": (lambda folder: make_imagefolder(folder, metadata="csv"), "imagefolder, metadata.csv"),
    "txt captions": (make_sidecar_folder, ".txt captions"),
    "save_to_disk": (make_saved_dataset, "datasets"),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_each_layout_trains_and_exports_a_pipeline_that_loads_and_generates(layout, tmp_path, components, capsys):
    from diffusers import DiffusionPipeline

    make_data, layout_name = LAYOUTS[layout]
    data = make_data(tmp_path / "data")
    out = tmp_path / "run"
    summary = train.main(tiny_config(data, out, components, ["train.max_steps=4", "train.guidance_scale=2.0"]))

    assert summary["steps"] == 4 and not summary["interrupted"]
    assert f"({layout_name}): 4 of 4 images used" in summary["data"]
    assert sorted(summary["losses"]) == [1, 2, 3, 4] and all(np.isfinite(list(summary["losses"].values())))
    pipeline_dir = Path(summary["pipeline"])
    assert pipeline_dir == out / "pipeline"
    assert {"model_index.json", "transformer", "vae", "text_encoder", "tokenizer", "scheduler"} <= {p.name for p in pipeline_dir.iterdir()}
    assert not list(pipeline_dir.rglob("*.bin")), "the export writes safetensors only"
    assert (out / "config.yaml").is_file() and (out / "checkpoints" / "checkpoint-0000004" / "config.yaml").is_file()

    pipe = DiffusionPipeline.from_pretrained(pipeline_dir)
    assert type(pipe).__name__ == "LatentDiTPipeline"
    assert pipe.config.default_guidance_scale == 2.0  # the run's guidance travels with the model
    image = pipe("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert image.shape == (1, 16, 16, 3) and np.isfinite(image).all()

    # The command line loads the same folder.
    capsys.readouterr()
    cli.main(["generate", "a blue circle", "--model", str(pipeline_dir), "--steps", "2", "--out", str(tmp_path / "cli.png"), "--device", "cpu"])
    assert Image.open(tmp_path / "cli.png").size == (16, 16)
    assert "saved" in capsys.readouterr().out


def test_class_folders_train_a_class_conditional_model(tmp_path, components):
    from diffusers import DiffusionPipeline

    data = make_class_folders(tmp_path / "data", per_class=2)  # circle/, square/
    out = tmp_path / "run"
    cfg = tiny_config(data, out, components, ["model.conditioning=class", "data.class_folders=true", "train.max_steps=3",
                                                "data.caption_dropout=0.5"])
    summary = train.main(cfg)

    assert summary["steps"] == 3 and "(class folders): 4 of 4 images used" in summary["data"]
    pipe = DiffusionPipeline.from_pretrained(out / "pipeline")
    config = pipe.transformer.config
    assert (config.conditioning, config.num_classes) == ("class", 2)
    assert pipe.text_encoder is None and pipe.tokenizer is None
    images = pipe(class_labels=[0, 1], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape == (2, 16, 16, 3)
    assert (out / "pipeline" / "samples.txt").read_text().split("\n")[:2] == ["class 0", "class 1"]


def test_class_conditioning_without_class_folders_fails_before_loading_models(tmp_path, components, monkeypatch):
    monkeypatch.setattr(train, "load_vae", fail_if_called)
    cfg = tiny_config(make_imagefolder(tmp_path / "data"), tmp_path / "run", components, ["model.conditioning=class"])
    with pytest.raises(ValueError, match="data.class_folders=true"):
        train.main(cfg)


# ---------------------------------------------------------------- learning


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_overfitting_four_images_at_least_halves_the_loss(prediction_type, tmp_path, components):
    # Pixel space (no VAE): 16-px images, a depth-2 width-32 DiT, lr 1e-3, 200 steps of batch 4.
    cfg = tiny_config(make_imagefolder(tmp_path / "data"), tmp_path / "run", components, [
        f"model.prediction_type={prediction_type}", "train.max_steps=200", "train.batch_size=4", "train.log_every=10",
    ], vae=False)
    losses = list(train.main(cfg)["losses"].values())

    assert len(losses) == 20
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    # Measured: the last/first ratio is 0.14-0.16 (epsilon), 0.29-0.33 (v), 0.18-0.19 (flow) over seeds 0-2.
    assert last < 0.5 * first, f"{prediction_type}: loss went from {first:.3f} to {last:.3f}"


def test_use_compile_compiles_every_block_and_trains_as_eager_does(tmp_path, components, monkeypatch):
    """train.use_compile: regional compilation (each DiT block compiled, one block's code reused by all), and the
    compiled run logs the eager run's losses."""
    from latent_dit.model import LatentDiTTransformer2DModel

    compiled_models, compile_blocks = [], LatentDiTTransformer2DModel.compile_repeated_blocks

    def recording(model, *args, **kwargs):
        compiled_models.append(model)
        return compile_blocks(model, *args, **kwargs)

    monkeypatch.setattr(LatentDiTTransformer2DModel, "compile_repeated_blocks", recording)
    torch._dynamo.reset()
    data = make_imagefolder(tmp_path / "data")
    eager = train.main(tiny_config(data, tmp_path / "eager", components, ["train.max_steps=3"]))
    assert not compiled_models
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    compiled = train.main(tiny_config(data, tmp_path / "compiled", components, ["train.max_steps=3", "train.use_compile=true"]))

    [model] = compiled_models
    assert all(block._compiled_call_impl is not None for block in model.blocks)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before, "nothing ran compiled"
    assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-4)


# ---------------------------------------------------------------- resume


@pytest.mark.parametrize("accumulation", [1, 2])
def test_stop_and_resume_reproduces_the_uninterrupted_run(accumulation, tmp_path, components, monkeypatch):
    # 6 images in batches of 2: three batches an epoch, so stopping after 4 steps stops mid-epoch
    # (and with 2 accumulation steps, after an epoch end that forced an early optimizer step).
    data = make_imagefolder(tmp_path / "data", count=6)
    overrides = [f"train.gradient_accumulation_steps={accumulation}", "train.max_steps=8"]
    seen = record_batches(monkeypatch)

    full = train.main(tiny_config(data, tmp_path / "full", components, overrides))
    full_batches = list(seen)
    seen.clear()
    first = train.main(tiny_config(data, tmp_path / "resumed", components, overrides), stop_after=4)
    assert first["interrupted"] and first["steps"] == 4 and first["pipeline"] is None
    assert [p.name for p in (tmp_path / "resumed" / "checkpoints").iterdir()] == ["checkpoint-0000004"]
    second = train.main(tiny_config(data, tmp_path / "resumed", components, overrides), resume="latest")

    assert second["steps"] == 8 and second["steps_this_run"] == 4 and not second["interrupted"]
    assert seen == full_batches, "the resumed run saw other batches (data order or position not restored)"
    assert {**first["losses"], **second["losses"]} == pytest.approx(full["losses"], rel=1e-6, abs=1e-7)
    assert read_metrics(tmp_path / "resumed") == pytest.approx(full["losses"], rel=1e-6, abs=1e-7)
    full_ema, resumed_ema = ema_weights(tmp_path / "full"), ema_weights(tmp_path / "resumed")
    for name, value in full_ema.items():
        torch.testing.assert_close(resumed_ema[name], value, rtol=1e-6, atol=1e-7, msg=f"EMA weight {name}")


def test_sigterm_writes_a_checkpoint_and_exits_0_then_resume_finishes(tmp_path, components):
    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    tree = tiny_tree(data, out, components)
    tree["train"]["max_steps"] = 100_000
    config = write_config(tmp_path / "run.yaml", tree)
    process = subprocess.Popen([sys.executable, "-m", "latent_dit.train", "--config", str(config)],
                               env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 120
        while not ((out / "metrics.jsonl").is_file() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
            assert process.poll() is None, process.stdout.read()
            assert time.time() < deadline, "training did not start within 120 s"
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()

    assert process.returncode == 0, output
    assert "received SIGTERM" in output and "interrupted: True" in output
    checkpoints = [p.name for p in (out / "checkpoints").iterdir()]
    assert len(checkpoints) == 1 and checkpoints[0].startswith("checkpoint-"), checkpoints
    stopped_at = int(checkpoints[0].split("-")[1])
    assert stopped_at == max(read_metrics(out)) >= 3
    assert not (out / "pipeline").exists()

    cfg = tiny_config(data, out, components, [f"train.max_steps={stopped_at + 2}"])
    summary = train.main(cfg, resume="latest")
    assert (summary["steps"], summary["steps_this_run"]) == (stopped_at + 2, 2)
    assert Path(summary["pipeline"], "model_index.json").is_file()


def test_resume_with_a_config_that_builds_another_model_names_the_settings_to_add(tmp_path, components):
    # A run started with DiT's per-block adaLN, resumed by a config that now gets the text default (PixArt-α's).
    data = make_imagefolder(tmp_path / "data")
    out = tmp_path / "run"
    started = ["model.adaln_single=false", "train.max_steps=4"]
    train.main(tiny_config(data, out, components, started), stop_after=2)

    with pytest.raises(ValueError, match="different model than this config builds") as error:
        train.main(tiny_config(data, out, components, ["train.max_steps=4"]), resume="latest")
    assert "--set model.adaln_single=false --set model.cross_attention_norm=true" in str(error.value)
    assert "adaLN_modulation" in str(error.value)  # names a weight that differs
    assert max(read_metrics(out)) == 2, "the failed resume must not train"

    summary = train.main(tiny_config(data, out, components, started), resume="latest")
    assert (summary["steps"], summary["steps_this_run"]) == (4, 2)


# ---------------------------------------------------------------- bad data


def fail_if_called(*args, **kwargs):
    raise AssertionError("a model was loaded before the data was checked")


def write_bad_data_folder(folder: Path) -> Path:
    """Two good images plus one of each kind of problem, all listed in metadata.jsonl."""
    folder.mkdir(parents=True)
    rows = []

    def add(name, caption, image=None, **save_kwargs):
        if image is not None:
            image.save(folder / name, **save_kwargs)
        rows.append({"file_name": name, "text": caption})

    make_imagefolder(folder / "good", count=2)
    for row in (folder / "good" / "metadata.jsonl").read_text().splitlines():
        add("good/" + json.loads(row)["file_name"], json.loads(row)["text"])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    add("corrupt.png", "random bytes")
    buffer = (folder / "good" / "red_circle.png").read_bytes()
    (folder / "truncated.png").write_bytes(buffer[: len(buffer) // 2])
    add("truncated.png", "half a file")
    add("rgba.png", "transparent", Image.new("RGBA", (24, 24), (255, 0, 0, 128)))
    add("grey.png", "grey", Image.new("L", (24, 24), 128))
    add("palette.png", "palette", Image.new("RGB", (24, 24), (0, 0, 255)).convert("P"))
    add("cmyk.jpg", "cmyk", Image.new("CMYK", (24, 24), (0, 255, 255, 0)))
    add("deep.png", "16-bit grey", Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)))
    add("small.png", "tiny", Image.new("RGB", (8, 8), (0, 255, 0)))
    add("empty.png", "", Image.new("RGB", (24, 24), (9, 9, 9)))
    add("missing.png", "listed but never written")
    Image.new("RGB", (24, 24)).save(folder / "unlisted.png")  # no caption: not in metadata
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return folder


def test_bad_data_is_skipped_or_converted_and_counted_in_the_run_summary(tmp_path, components):
    data = write_bad_data_folder(tmp_path / "data")
    summary = train.main(tiny_config(data, tmp_path / "run", components, ["train.max_steps=2", "train.batch_size=4"]))

    counts = dict(line.strip().split(": ", 1)[0:2] for line in summary["data"].splitlines()[1:])
    counts = {problem: int(text.split()[0]) for problem, text in counts.items()}
    # good ×2 + rgba, grey, palette, cmyk, 16-bit, small are used; two unreadable, two uncaptioned, one missing.
    assert "8 of 13 images used" in summary["data"]
    assert counts == {"skipped_corrupt": 2, "skipped_missing_caption": 2, "skipped_missing_file": 1,
                      "converted_mode": 5, "upscaled_small": 1}
    assert summary["steps"] == 2 and all(np.isfinite(list(summary["losses"].values())))


def test_a_folder_without_usable_images_fails_before_any_model_loads(tmp_path, components, monkeypatch):
    monkeypatch.setattr(train, "load_vae", fail_if_called)
    monkeypatch.setattr(train, "load_text_encoder", fail_if_called)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(b"not an image")
    (data / "b.png").write_bytes(b"")
    (data / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n{"file_name": "b.png", "text": "b"}\n')

    with pytest.raises(DataError, match=r"No usable image in .*found 2 candidate images, none usable") as error:
        train.main(tiny_config(data, tmp_path / "run", components))
    assert "skipped_corrupt: 2" in str(error.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("avx512_bf16, amx, warned", [(False, False, True), (True, False, False), (False, True, False)])
def test_bf16_on_a_cpu_without_native_bf16_warns_with_the_fix(avx512_bf16, amx, warned, monkeypatch, caplog):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    with caplog.at_level("WARNING", logger="latent_dit.train"):
        message = train.warn_if_emulated_bf16("bf16", torch.device("cpu"))
    assert (message is not None) == warned
    if warned:
        assert "mixed_precision: no" in message and message in caplog.text
    # float32 on any CPU, and bf16 on a GPU, never warn
    assert train.warn_if_emulated_bf16("no", torch.device("cpu")) is None
    assert train.warn_if_emulated_bf16("bf16", torch.device("cuda")) is None


def test_benchmark_trains_the_bare_step_on_the_batches_the_loop_draws(tmp_path, components, monkeypatch):
    """benchmark_train's bare step runs on the loop's batches: a batch's longest caption sets the step's text length."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    from benchmark_train import loop_batches
    from latent_dit.data import BucketBatchSampler

    seen = record_batches(monkeypatch)
    train.main(tiny_config(make_imagefolder(tmp_path / "data", count=6), tmp_path / "run", components, ["train.max_steps=5"]))
    assert loop_batches(BucketBatchSampler([0] * 6, 2, seed=0), 5) == seen  # 3 batches an epoch: into epoch 1


def test_benchmark_train_compares_cached_training_with_the_bare_model_step(tiny_pipeline_dir, tmp_path):
    """scripts/benchmark_train.py --modes cached bare --repeats 3: the input-bound check of issue 6 runs and reports its ratio."""
    out = tmp_path / "bench"
    sets = [f"components.vae={tiny_pipeline_dir}", "components.vae_subfolder=vae", f"components.text_encoder={tiny_pipeline_dir}",
            "components.text_encoder_subfolder=text_encoder", "components.tokenizer_subfolder=tokenizer",
            "data.resolution=32", "train.batch_size=4"]
    command = [sys.executable, str(REPO_ROOT / "scripts" / "benchmark_train.py"), "--config", "tiny-cpu", "--synthetic", "8",
               "--steps", "2", "--warmup", "1", "--modes", "cached", "bare", "--repeats", "3", "--out", str(out), *[f"--set={s}" for s in sets]]
    subprocess.run(command, check=True, cwd=tmp_path, env=subprocess_env(), capture_output=True)
    results = json.loads((out / "benchmark.json").read_text())
    cached, bare = results["modes"]["cached"], results["modes"]["bare"]
    assert bare["data"] == "the loop's cached batches, resident" and bare["measured_steps"] == 2 and bare["images_per_second"] > 0
    assert cached["cached"] is True and cached["images_per_second"] > 0
    for mode in (cached, bare):  # three runs each, interleaved; the median one is reported
        assert len(mode["images_per_second_runs"]) == 3 and mode["images_per_second"] == sorted(mode["images_per_second_runs"])[1]
    assert cached["cache_build_seconds"] > 0 and "cache_build_seconds" not in bare  # built once, by the first cached run
    assert results["cached_over_bare"] == pytest.approx(cached["images_per_second"] / bare["images_per_second"], abs=1e-3)
    assert results["peak_flops_source"].startswith("measured")  # a CPU: this machine's GEMM rate
    for mode in (cached, bare):  # images/s × model FLOPs per image (counted on the bare step's batch) / peak
        assert mode["mfu"] == pytest.approx(mode["images_per_second"] * bare["model_flops_per_image"] / results["peak_flops"])
    assert bare["model_flops_per_image"] > 0
    assert results["model"] == "DiT-S/2 with hidden_size=64, depth=2, num_heads=4"  # the config's sizes, not only its preset
    table = (out / "benchmark.md").read_text()
    assert "| DiT-S/2 with hidden_size=64, depth=2, num_heads=4 |" in table and f"| {bare['mfu']:.1%} |" in table
