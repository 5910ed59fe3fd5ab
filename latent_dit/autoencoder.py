"""The project's own image autoencoder: a small diffusers `AutoencoderTiny` (TAESD's architecture) trained
from scratch by `scripts/train_autoencoder.py`, with its loss, its PSNR and the latent statistics the DiT needs.

`AutoencoderTiny` is deterministic (no KL term, no sampling): the encoder gives latents, the decoder first
squashes them into (-3, 3) with 3·tanh(z/3) and then upsamples. Only the sizes below are ours; the class,
its `save_pretrained` layout and `latent_dit.components.load_vae` are diffusers'.
"""

import math

import torch
import torch.nn.functional as F
from diffusers import AutoencoderTiny

# Sizes, keyed by name. `AutoencoderTiny` keeps one width through all levels (its strided and upsampling
# convolutions map a width to itself); the number of levels sets the downsampling (3: ÷4, 4: ÷8).
# Block counts go image -> latent for the encoder and latent -> image for the decoder.
PRESETS = {
    # 64-px emoji -> 16x16x4 latents (12x fewer numbers); 0.3 M parameters, ~2.7 GFLOP per training
    # image, so it trains on a 2-core CPU.
    "emoji-f4": dict(encoder_block_out_channels=(32,) * 3, num_encoder_blocks=(1, 2, 2),
                     decoder_block_out_channels=(32,) * 3, num_decoder_blocks=(2, 2, 1)),
    # 128-px emoji -> 16x16x4 latents (48x fewer numbers); 1.8 M parameters.
    "emoji-f8": dict(encoder_block_out_channels=(64,) * 4, num_encoder_blocks=(1, 2, 2, 2),
                     decoder_block_out_channels=(64,) * 4, num_decoder_blocks=(2, 2, 2, 1)),
    # emoji-f4's encoder (so its latent space) with a decoder twice as wide and deeper: 0.85 M decoder
    # parameters. Trained with `decoder_from` on a frozen emoji-f4 encoder, as sd-vae-ft-mse retrained SD's decoder.
    "emoji-f4-wide-decoder": dict(encoder_block_out_channels=(32,) * 3, num_encoder_blocks=(1, 2, 2),
                                  decoder_block_out_channels=(64,) * 3, num_decoder_blocks=(3, 3, 1)),
    # TAESD's own sizes (2.4 M parameters, ÷8), trained from scratch like the others.
    "taesd": dict(encoder_block_out_channels=(64,) * 4, num_encoder_blocks=(1, 3, 3, 3),
                  decoder_block_out_channels=(64,) * 4, num_decoder_blocks=(3, 3, 3, 1)),
}


def build_autoencoder(preset: str = "emoji-f4", latent_channels: int = 4, **overrides) -> AutoencoderTiny:
    """A freshly initialised `AutoencoderTiny` of a preset's sizes; `overrides` replace any of its fields."""
    if preset not in PRESETS:
        raise ValueError(f"autoencoder preset {preset!r} is not one of {sorted(PRESETS)}")
    vae = AutoencoderTiny(in_channels=3, out_channels=3, latent_channels=latent_channels, **{**PRESETS[preset], **overrides})
    # The decoder maps its [0, 1] output to [-1, 1] with 2x - 1, so a zero bias starts every image black;
    # 0.5 starts it mid-grey, halfway to anything, which saves the first steps of training.
    torch.nn.init.constant_(vae.decoder.layers[-1].bias, 0.5)
    return vae


def with_new_decoder(source: AutoencoderTiny, preset: str, use_source_decoder: bool = False) -> AutoencoderTiny:
    """A `preset` autoencoder whose encoder is `source`'s, frozen, with a fresh decoder of the preset's sizes
    (or, with `use_source_decoder`, a copy of `source`'s decoder to fine-tune; the sizes must then match).

    Only the decoder then trains, so the latent space (and `scaling_factor` / `shift_factor`, copied over)
    stays `source`'s: cached latents and any DiT trained on them keep working with the new decoder.
    """
    if not isinstance(source, AutoencoderTiny):
        raise ValueError(f"decoder_from must be an AutoencoderTiny (this script's exports), not {type(source).__name__}")
    vae = build_autoencoder(preset, source.config.latent_channels)

    def require_source_sizes(part: str, why: str):
        for key in (f"{part}_block_out_channels", f"num_{part}_blocks"):
            if tuple(vae.config[key]) != tuple(source.config[key]):
                raise ValueError(f"{why}preset {preset!r} has {key}={tuple(vae.config[key])} but the source autoencoder "
                                 f"has {tuple(source.config[key])}: pick a preset with the source's {part} sizes")

    require_source_sizes("encoder", "")
    vae.encoder.load_state_dict(source.encoder.state_dict())
    vae.encoder.requires_grad_(False)
    if use_source_decoder:
        require_source_sizes("decoder", "use_source_decoder: ")
        vae.decoder.load_state_dict(source.decoder.state_dict())
    vae.register_to_config(scaling_factor=source.config.scaling_factor, shift_factor=source.config.shift_factor)
    return vae


def downsampling_factor(vae: AutoencoderTiny) -> int:
    return 2 ** (len(vae.config.encoder_block_out_channels) - 1)


def reconstruction_loss(reconstruction: torch.Tensor, target: torch.Tensor, scales=(1, 2, 4)) -> torch.Tensor:
    """Mean L1 over an image pyramid: the pixels, and 2x, 4x... average-pooled copies.

    The pooled terms count colour and shape errors again at coarser scales, so blurry-but-right beats
    sharp-but-shifted early on: a cheap stand-in for a perceptual loss (LPIPS would need VGG weights).
    """
    terms = [F.l1_loss(F.avg_pool2d(reconstruction, s), F.avg_pool2d(target, s)) if s > 1
             else F.l1_loss(reconstruction, target) for s in scales]
    return torch.stack(terms).mean()


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB of each image, for images in [-1, 1] (peak-to-peak range 2)."""
    mse = (reconstruction.clamp(-1, 1) - target).square().flatten(1).mean(1)
    return 10 * torch.log10(4.0 / mse.clamp(min=1e-10))


@torch.no_grad()
def reconstruct(vae: AutoencoderTiny, pixel_values: torch.Tensor) -> torch.Tensor:
    """decode(encode(x)) in float, without the byte quantisation of `AutoencoderTiny.forward`: the DiT's
    latents never pass through bytes either."""
    return vae.decode(vae.encode(pixel_values).latents).sample


@torch.no_grad()
def latent_statistics(vae: AutoencoderTiny, pixel_values: torch.Tensor, batch_size: int = 64) -> tuple[float, float]:
    """(mean, std) of every latent number over these images: the DiT trains on (z - mean) / std, so the
    exported config stores shift_factor = mean and scaling_factor = 1 / std."""
    total, total_sq, count = 0.0, 0.0, 0
    for start in range(0, len(pixel_values), batch_size):
        latents = vae.encode(pixel_values[start:start + batch_size].to(vae.device, vae.dtype)).latents.double()
        total += latents.sum().item()
        total_sq += latents.square().sum().item()
        count += latents.numel()
    mean = total / count
    return mean, math.sqrt(max(total_sq / count - mean**2, 1e-12))


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
