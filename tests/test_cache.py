"""Tests for latent_dit.cache: cached and uncached training see identical inputs and losses, a cached run
needs the VAE and text encoder only to export, an interrupted cache resumes shard by shard, and a stale
cache is refused by training (naming what changed) and rebuilt by `latent-dit cache`.
"""

import json
import os
from pathlib import Path

import pytest
import torch

from latent_dit import cache as cache_module
from latent_dit import cli, train
from latent_dit.cache import CachedDataset, StaleCacheError, build_cache, cache_fingerprint, collate_cached
from latent_dit.components import load_text_encoder, load_vae
from latent_dit.data import collate, scan_dataset
from latent_dit.encoding import encode_captions, latent_scaling
from latent_dit.objective import build_objective
from training_helpers import make_components, make_imagefolder, tiny_config


@pytest.fixture(scope="module")
def components(tmp_path_factory) -> dict:
    return make_components(tmp_path_factory.mktemp("components"))




def cached_config(tmp_path, components, overrides=(), count=4):
    data = tmp_path / "data"
    if not data.exists():
        make_imagefolder(data, count=count)
    return tiny_config(data, tmp_path / "run", components, [f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def cache_with_cli(cfg_path: Path, *overrides: str):
    cli.main(["cache", "--config", str(cfg_path), "--batch-size", "3", *[f"--set={o}" for o in overrides]])


def fail_if_called(*args, **kwargs):
    raise AssertionError("a frozen model was loaded")


# ---------------------------------------------------------------- identical inputs


@pytest.mark.parametrize("prediction_type", ["epsilon", "flow"])
def test_cached_and_uncached_batches_give_identical_training_inputs(prediction_type, tmp_path, components):
    # caption_dropout 0.5, so some rows take the null caption: the cached null encoding must match too.
    cfg = cached_config(tmp_path, components, [f"model.prediction_type={prediction_type}", "data.caption_dropout=0.5"])
    vae = load_vae(components["vae"])
    tokenizer, text_encoder = load_text_encoder(components["text_encoder"])
    build_cache(cfg, vae, tokenizer, text_encoder, batch_size=3, show_progress=False)  # other batches than training's

    cached = CachedDataset(cfg.data.cache_dir, cache_fingerprint(cfg))
    records, _, _ = scan_dataset(cfg.data.source, show_progress=False)
    uncached = train.image_dataset(cfg, records, scale_factor=2)
    null = {k: v[0] for k, v in encode_captions(tokenizer, text_encoder, [""], cfg.data.max_text_length).items()}
    frozen_uncached = {"vae": vae, "tokenizer": tokenizer, "text_encoder": text_encoder, "null_text": null,
                       "shift_scale": latent_scaling(dict(vae.config)), "num_classes": 0}
    frozen_cached = {"null_text": cached.null_text, "shift_scale": latent_scaling(cached.manifest["vae_config"]), "num_classes": 0}
    objective = build_objective(prediction_type)

    dropped = 0
    for seed, indices in enumerate([[2, 0], [1, 3], [3, 2, 1, 0]]):
        a = train.training_inputs(collate_cached([cached[i] for i in indices]), frozen_cached, objective, cfg,
                                  torch.Generator().manual_seed(seed))
        b = train.training_inputs(collate([uncached[i] for i in indices]), frozen_uncached, objective, cfg,
                                  torch.Generator().manual_seed(seed))
        for key in ("latents", "noisy_latents"):
            torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-6, msg=f"{key} of batch {indices}")
        assert torch.equal(a["noise"], b["noise"]) and torch.equal(a["timesteps"], b["timesteps"])
        assert a["conditioning"].keys() == b["conditioning"].keys() == {"encoder_hidden_states", "encoder_attention_mask", "pooled_projections"}
        for key in a["conditioning"]:
            torch.testing.assert_close(a["conditioning"][key], b["conditioning"][key], rtol=1e-6, atol=1e-6, msg=key)
        mask = b["conditioning"]["encoder_attention_mask"]
        dropped += int((mask.sum(1) == null["mask"].sum()).sum())
        # Padding columns that neither the batch's captions nor the null caption use are dropped (exact: they
        # are masked out), before caption dropout picks rows, so the length is the longest of those.
        longest = max([int(cached[i]["mask"].sum()) for i in indices] + [int(null["mask"].sum())])
        assert mask.shape[1] == longest < cfg.data.max_text_length
        assert b["conditioning"]["encoder_hidden_states"].shape[1] == longest
    assert dropped > 0, "no caption was dropped: the null-caption path went untested"
    assert vae.config.latent_channels == a["latents"].shape[1] and a["latents"].std() > 0


def test_cached_run_matches_uncached_run_and_loads_encoders_only_to_export(tmp_path, components, monkeypatch):
    cfg = cached_config(tmp_path, components, ["train.max_steps=6"])
    uncached = train.main(tiny_config(cfg.data.source, tmp_path / "uncached", components, ["train.max_steps=6"]))
    cache_with_cli(tmp_path / "run.yaml")

    events = []
    for name in ("load_vae", "load_text_encoder", "training_inputs", "export_pipeline"):
        original = getattr(train, name)
        monkeypatch.setattr(train, name, lambda *a, _name=name, _original=original, **k: events.append(_name) or _original(*a, **k))
    cached = train.main(cfg)

    assert cached["cached"] and not uncached["cached"]
    assert cached["losses"] == pytest.approx(uncached["losses"], rel=1e-5, abs=1e-6)
    assert events == ["training_inputs"] * 6 + ["load_vae", "load_text_encoder", "export_pipeline"]
    assert Path(cached["pipeline"], "vae").is_dir()


def test_batches_reach_training_inputs_as_collated_not_moved_by_the_loader(tmp_path, components, monkeypatch):
    """On a GPU, Accelerate's loader would move each batch to the device before `training_inputs`, where the
    cached captions' masks meet the null caption's (read from the cache, on the CPU) to find the caption length:
    tensors on two devices, an error at the first step (and a device sync per step). The loop moves them itself."""
    import accelerate.data_loader

    moved, send_to_device = [], accelerate.data_loader.send_to_device
    monkeypatch.setattr(accelerate.data_loader, "send_to_device",
                        lambda batch, device, *a, **k: moved.append(device) or send_to_device(batch, device, *a, **k))
    cfg = cached_config(tmp_path, components, ["train.max_steps=2"])
    cache_with_cli(tmp_path / "run.yaml")
    summary = train.main(cfg)
    assert summary["cached"] and summary["steps"] == 2
    assert moved == [], f"the loader sent batches to {moved}"


def test_cached_run_with_validation_loads_encoders_at_the_first_sample_grid(tmp_path, components, monkeypatch):
    cfg = cached_config(tmp_path, components, ["train.max_steps=4", "train.validate_every=2"])
    cache_with_cli(tmp_path / "run.yaml")
    calls = []
    original = train.load_vae
    monkeypatch.setattr(train, "load_vae", lambda *a, **k: calls.append(len(read_steps(cfg))) or original(*a, **k))
    train.main(cfg)
    assert calls == [2], "the VAE is loaded once, when step 2's sample grid is drawn"
    assert sorted(p.name for p in Path(cfg.train.output_dir, "samples").glob("*.png")) == ["step-0000002.png", "step-0000004.png"]


def read_steps(cfg) -> list[int]:
    metrics = Path(cfg.train.output_dir, "metrics.jsonl")
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.is_file() else []


# ---------------------------------------------------------------- resuming and staleness


def test_interrupted_cache_recomputes_only_the_missing_shard(tmp_path, components, monkeypatch):
    monkeypatch.setattr(cache_module, "SHARD_SIZE", 2)
    cfg = cached_config(tmp_path, components, count=6)
    cache_with_cli(tmp_path / "run.yaml")
    cache_dir = Path(cfg.data.cache_dir)
    shards = sorted(cache_dir.glob("shard-*.safetensors"))
    assert [p.name for p in shards] == ["shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    before = CachedDataset(cache_dir, cache_fingerprint(cfg))
    stamps = {p.name: p.stat().st_mtime_ns for p in shards}

    shards[1].unlink()  # as if `latent-dit cache` had been killed while writing it
    with pytest.raises(StaleCacheError, match=r"incomplete \(1 of 3 shards missing\)"):
        train.main(cfg)

    encoded = []
    original = cache_module.encode_images
    monkeypatch.setattr(cache_module, "encode_images", lambda vae, pixels: encoded.append(len(pixels)) or original(vae, pixels))
    cache_with_cli(tmp_path / "run.yaml")
    assert encoded == [2], "only the missing shard's two images are encoded again"
    assert {p.name: p.stat().st_mtime_ns for p in shards if p.name != shards[1].name} == {
        k: v for k, v in stamps.items() if k != shards[1].name}
    after = CachedDataset(cache_dir, cache_fingerprint(cfg))
    assert after.tensors.keys() == before.tensors.keys()
    for key, value in before.tensors.items():
        torch.testing.assert_close(after.tensors[key], value, rtol=1e-6, atol=1e-6)


def touch_an_image(cfg):
    image = sorted(Path(cfg.data.source).glob("*.png"))[0]
    stamp = image.stat().st_mtime_ns + 10**9
    os.utime(image, ns=(stamp, stamp))
    return []


STALE = {
    "resolution": (lambda cfg: ["data.resolution=32"], r"resolution: 16 -> 32"),
    "touched image": (touch_an_image, r"data: '[0-9a-f]+' -> '[0-9a-f]+'"),
    "text length": (lambda cfg: ["data.max_text_length=16"], r"max_text_length: 77 -> 16"),
}


@pytest.mark.parametrize("change", list(STALE))
def test_stale_cache_is_refused_by_training_and_rebuilt_by_the_cli(change, tmp_path, components, monkeypatch):
    cfg = cached_config(tmp_path, components, ["train.max_steps=1"])
    cache_with_cli(tmp_path / "run.yaml")
    make_change, message = STALE[change]
    overrides = make_change(cfg)
    stale_cfg = cached_config(tmp_path, components, ["train.max_steps=1", *overrides])

    with monkeypatch.context() as patch:
        patch.setattr(train, "load_vae", fail_if_called)  # refused before any model loads
        with pytest.raises(StaleCacheError, match=message) as error:
            train.main(stale_cfg)
    assert "rerun `latent-dit cache`" in str(error.value)

    cache_with_cli(tmp_path / "run.yaml", *overrides)
    manifest = json.loads(Path(cfg.data.cache_dir, "manifest.json").read_text())
    assert manifest["fingerprint"] == cache_fingerprint(stale_cfg)
    assert train.main(stale_cfg)["cached"]


def test_cache_refuses_random_crops_and_flips(tmp_path, components):
    cfg = cached_config(tmp_path, components, ["data.random_flip=true"])
    with pytest.raises(ValueError, match="data.random_flip=false"):
        build_cache(cfg, None, show_progress=False)
    assert not Path(cfg.data.cache_dir).exists()


def test_pixel_space_cache_stores_the_images_themselves(tmp_path, components):
    cfg = cached_config(tmp_path, components, ["model.conditioning=none", "data.empty_caption=keep"])
    cfg.components.vae = None
    build_cache(cfg, None, show_progress=False)
    cached = CachedDataset(cfg.data.cache_dir, cache_fingerprint(cfg))
    records, _, _ = scan_dataset(cfg.data.source, show_progress=False)
    pixels = train.image_dataset(cfg, records, scale_factor=1)[1]["pixel_values"]
    assert torch.equal(cached[1]["latent_mean"], pixels) and not cached[1]["latent_std"].any()
    assert cached.null_text is None and "text" not in cached[1]
