"""Tests for latent_dit/autoencoder.py and scripts/train_autoencoder.py: the loss and PSNR on closed-form
cases, latent statistics, and short training runs of a tiny AutoencoderTiny (loss falls, the export loads
with load_vae and round-trips with unit-spread latents, resuming repeats the uninterrupted run)."""

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from latent_dit import autoencoder
from latent_dit.autoencoder import PRESETS, build_autoencoder, latent_statistics, psnr, reconstruct, reconstruction_loss
from latent_dit.components import load_vae, vae_scale_factor

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = dict(encoder_block_out_channels=(8, 8), num_encoder_blocks=(1, 1),
            decoder_block_out_channels=(8, 8), num_decoder_blocks=(1, 1))  # 2 levels: ÷2



from training_helpers import load_script  # noqa: E402

train_ae = load_script("train_autoencoder")




@pytest.fixture
def tiny_preset(monkeypatch):
    monkeypatch.setitem(PRESETS, "test-tiny", TINY)
    return "test-tiny"


@pytest.fixture
def image_folder(tmp_path):
    """Eight 16-px coloured shapes on white, with captions, and two more as a held-out folder."""
    colors = [(255, 0, 0), (0, 160, 0), (0, 0, 255), (255, 200, 0), (128, 0, 128), (0, 128, 128), (90, 60, 30), (0, 0, 0),
              (255, 100, 100), (40, 40, 200)]
    for name, indices in (("train", range(8)), ("heldout", range(8, 10))):
        folder = tmp_path / name
        folder.mkdir()
        rows = []
        for i in indices:
            image = Image.new("RGB", (16, 16), (255, 255, 255))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if i % 2 else draw.rectangle)([2 + i % 3, 3, 13, 12 - i % 2], fill=colors[i])
            image.save(folder / f"{i}.png")
            rows.append(json.dumps({"file_name": f"{i}.png", "text": f"shape {i}"}))
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return tmp_path


def tiny_config(image_folder, out, preset, **overrides):
    values = dict(data=str(image_folder / "train"), heldout=str(image_folder / "heldout"), resolution=16, preset=preset,
                  output_dir=str(out), max_steps=40, batch_size=4, learning_rate=3e-3, warmup_steps=0, log_every=5,
                  checkpoint_every=1000, stat_images=8, eval_images=2)
    return train_ae.AutoencoderTrainConfig(**{**values, **overrides})


# ---------------------------------------------------------------- library


def test_presets_build_with_their_downsampling():
    for name, factor in (("emoji-f4", 4), ("emoji-f8", 8), ("taesd", 8)):
        vae = build_autoencoder(name)
        assert autoencoder.downsampling_factor(vae) == vae_scale_factor(vae) == factor
        assert vae.encode(torch.zeros(1, 3, 32, 32)).latents.shape == (1, 4, 32 // factor, 32 // factor)
    assert autoencoder.count_parameters(build_autoencoder("emoji-f4")) < 1_000_000
    with pytest.raises(ValueError, match="emoji-f4"):
        build_autoencoder("huge")


def test_psnr_closed_form():
    target = torch.zeros(2, 3, 4, 4)
    reconstruction = torch.full_like(target, 0.1)  # MSE 0.01 on a peak-to-peak range of 2
    assert psnr(reconstruction, target) == pytest.approx(torch.tensor([10 * math.log10(4 / 0.01)] * 2))
    # Clamped to [-1, 1] first: 5.0 counts as 1.0, MSE 1.
    assert psnr(torch.full_like(target, 5.0), target).tolist() == pytest.approx([10 * math.log10(4)] * 2)


def test_pyramid_loss_ignores_what_pooling_averages_away():
    target = torch.zeros(1, 3, 8, 8)
    checkerboard = ((torch.arange(8)[:, None] + torch.arange(8)[None, :]) % 2 * 2 - 1).float() * 0.5
    reconstruction = target + checkerboard  # L1 0.5 per pixel, but every 2x2 average is exact
    assert reconstruction_loss(reconstruction, target, scales=(1,)).item() == pytest.approx(0.5)
    assert reconstruction_loss(reconstruction, target, scales=(1, 2, 4)).item() == pytest.approx(0.5 / 3)
    shifted = target + 0.3  # a colour error shows at every scale
    assert reconstruction_loss(shifted, target, scales=(1, 2, 4)).item() == pytest.approx(0.3)


def test_latent_statistics_match_the_latents(tiny_preset):
    vae = build_autoencoder(tiny_preset).eval()
    pixels = torch.rand(5, 3, 8, 8) * 2 - 1
    latents = vae.encode(pixels).latents.double()
    mean, std = latent_statistics(vae, pixels, batch_size=2)
    assert mean == pytest.approx(latents.mean().item(), abs=1e-6)
    assert std == pytest.approx(latents.std(unbiased=False).item(), rel=1e-5)


# ---------------------------------------------------------------- training script


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "ae.yaml"
    path.write_text("data: images\nmax_steps: 7\n")
    cfg = train_ae.load_config(path, ["batch_size=3", "learning_rate=1e-4"])
    assert (cfg.data, cfg.max_steps, cfg.batch_size, cfg.learning_rate) == ("images", 7, 3, 1e-4)
    with pytest.raises(ValueError, match="max_stepz"):
        train_ae.load_config(path, ["max_stepz=3"])
    with pytest.raises(ValueError, match="batch_size"):
        train_ae.load_config(path, ["batch_size=many"])
    shipped = train_ae.load_config(REPO_ROOT / "configs" / "autoencoder-emoji.yaml")
    assert shipped.preset in PRESETS


def test_training_lowers_the_loss_and_exports_a_loadable_autoencoder(image_folder, tmp_path, tiny_preset):
    out = tmp_path / "run"
    summary = train_ae.main(tiny_config(image_folder, out, tiny_preset), show_progress=False)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and losses[-1] < 0.7 * losses[0]

    vae = load_vae(str(out / "autoencoder"))
    assert type(vae).__name__ == "AutoencoderTiny" and vae_scale_factor(vae) == 2
    assert (out / "autoencoder" / "diffusion_pytorch_model.safetensors").is_file()
    saved = json.loads((out / "autoencoder" / "reconstruction.json").read_text())
    assert saved == json.loads(json.dumps(summary)) and saved["psnr_on"] == "heldout" and saved["psnr_images"] == 2

    # The stored scaling makes the training latents zero-mean, unit-spread: what the DiT trains on.
    train_pixels = train_ae.to_model_range(train_ae.load_images(str(image_folder / "train"), 16, show_progress=False))
    with torch.no_grad():
        latents = vae.encode(train_pixels).latents
    scaled = (latents - vae.config.shift_factor) * vae.config.scaling_factor
    assert scaled.mean().item() == pytest.approx(0.0, abs=1e-4)
    assert scaled.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-3)

    # Round trip: the reported PSNR is that of decode(encode(x)) on the held-out images.
    heldout = train_ae.to_model_range(train_ae.load_images(str(image_folder / "heldout"), 16, show_progress=False))
    reconstruction = reconstruct(vae, heldout)
    assert reconstruction.shape == heldout.shape
    assert psnr(reconstruction, heldout).mean().item() == pytest.approx(saved["psnr"], abs=1e-3)
    torch.manual_seed(0)  # main() seeds the same way before building the model: this is its starting point
    untrained = psnr(reconstruct(build_autoencoder(tiny_preset), heldout), heldout).mean().item()
    assert saved["psnr"] > untrained + 3, (untrained, saved["psnr"])
    assert (out / "reconstructions.png").is_file()


def test_resumed_training_repeats_the_uninterrupted_run(image_folder, tmp_path, tiny_preset):
    straight = tmp_path / "straight"
    train_ae.main(tiny_config(image_folder, straight, tiny_preset, max_steps=10), show_progress=False)
    resumed = tmp_path / "resumed"
    cfg = tiny_config(image_folder, resumed, tiny_preset, max_steps=10)
    assert train_ae.main(cfg, stop_after=4, show_progress=False) == {}  # stopped early: checkpoint, no export
    assert not (resumed / "autoencoder").exists() and (resumed / "checkpoints" / "checkpoint-0000004").is_dir()
    train_ae.main(cfg, resume="latest", show_progress=False)
    a, b = load_vae(str(straight / "autoencoder")), load_vae(str(resumed / "autoencoder"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)
    assert a.config.scaling_factor == pytest.approx(b.config.scaling_factor)


def test_too_few_images_is_an_error(image_folder, tmp_path, tiny_preset):
    with pytest.raises(ValueError, match="fewer than batch_size"):
        train_ae.main(tiny_config(image_folder, tmp_path / "run", tiny_preset, batch_size=9), show_progress=False)


def test_a_new_decoder_trains_on_the_frozen_encoder_and_keeps_the_latent_space(image_folder, tmp_path, tiny_preset,
                                                                                monkeypatch, fresh_accelerate_state):
    """decoder_from: the export has the source's encoder weights and latent factors, the preset's wider decoder,
    and that decoder has learnt (its reconstructions beat the untrained one's); bf16 autocast trains it too."""
    source_dir = tmp_path / "source"
    train_ae.main(tiny_config(image_folder, source_dir, tiny_preset, max_steps=5), show_progress=False)
    source = load_vae(str(source_dir / "autoencoder"))
    monkeypatch.setitem(PRESETS, "test-wide-decoder", {**TINY, "decoder_block_out_channels": (16, 16),
                                                        "num_decoder_blocks": (2, 1)})
    out = tmp_path / "decoder"
    fresh_accelerate_state()  # a new process's worth of Accelerate state: this run is in bf16
    summary = train_ae.main(tiny_config(image_folder, out, "test-wide-decoder", decoder_from=str(source_dir / "autoencoder"),
                                        mixed_precision="bf16"), show_progress=False)
    vae = load_vae(str(out / "autoencoder"))
    assert tuple(vae.config.decoder_block_out_channels) == (16, 16) and summary["decoder_from"] == str(source_dir / "autoencoder")
    for name, weight in source.encoder.state_dict().items():
        torch.testing.assert_close(vae.encoder.state_dict()[name], weight, msg=name)
    assert vae.config.scaling_factor == source.config.scaling_factor and vae.config.shift_factor == source.config.shift_factor
    heldout = train_ae.to_model_range(train_ae.load_images(str(image_folder / "heldout"), 16, show_progress=False))
    torch.manual_seed(0)
    untrained = autoencoder.with_new_decoder(source, "test-wide-decoder")
    assert summary["psnr"] > psnr(reconstruct(untrained, heldout), heldout).mean().item() + 3

    # use_source_decoder fine-tunes the source's decoder instead: at learning rate 0 the export is that decoder,
    # with latent_noise recorded; with a decoder of other sizes it is refused, naming the mismatch.
    fresh_accelerate_state()
    tuned = train_ae.main(tiny_config(image_folder, tmp_path / "tuned", "test-wide-decoder", decoder_from=str(out / "autoencoder"),
                                      use_source_decoder=True, latent_noise=0.1, learning_rate=0.0, max_steps=2),
                          show_progress=False)
    assert tuned["use_source_decoder"] and tuned["latent_noise"] == 0.1
    assert tuned["psnr"] == pytest.approx(summary["psnr"], abs=1e-3)
    tuned_decoder = load_vae(str(tmp_path / "tuned" / "autoencoder")).decoder.state_dict()
    for name, weight in vae.decoder.state_dict().items():
        torch.testing.assert_close(tuned_decoder[name], weight, msg=name)
    with pytest.raises(ValueError, match="use_source_decoder: .*decoder_block_out_channels"):
        autoencoder.with_new_decoder(vae, tiny_preset, use_source_decoder=True)
    with pytest.raises(ValueError, match="use_source_decoder needs decoder_from"):
        train_ae.main(tiny_config(image_folder, out, tiny_preset, use_source_decoder=True), show_progress=False)

    # An encoder of other sizes is a different latent space: refused, naming the mismatch.
    monkeypatch.setitem(PRESETS, "test-other-encoder", {**TINY, "encoder_block_out_channels": (16, 16)})
    with pytest.raises(ValueError, match="encoder_block_out_channels"):
        autoencoder.with_new_decoder(source, "test-other-encoder")
    with pytest.raises(ValueError, match="latent_noise needs decoder_from"):
        train_ae.main(tiny_config(image_folder, out, tiny_preset, latent_noise=0.1), show_progress=False)
    with pytest.raises(ValueError, match="mixed_precision"):
        train_ae.main(tiny_config(image_folder, out, "test-wide-decoder", mixed_precision="fp8"), show_progress=False)


def test_latent_noise_perturbs_the_decoder_input_in_training_only():
    vae = build_autoencoder("emoji-f4")
    vae.register_to_config(scaling_factor=4.0)
    seen = []
    decode = vae.decode
    vae.decode = lambda latents: seen.append(latents) or decode(latents)
    model = train_ae.EncodeDecode(vae, latent_noise=0.5)
    pixels = torch.rand(8, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        clean = vae.encode(pixels).latents
        model.train()(pixels)
        model.eval()(pixels)
    # In DiT units ((z - shift) * scaling_factor) the noise has std 0.5; evaluation decodes the exact latents.
    assert ((seen[0] - clean) * 4.0).std().item() == pytest.approx(0.5, rel=0.05)
    torch.testing.assert_close(seen[1], clean)
