"""Images -> latent distributions and captions -> text states: one code path for the cache and for training.

Keeping both paths here is what makes cached and uncached training see identical inputs.
"""

import torch

from .pipelines.pipeline_latent_dit import encode_text, pool_prompt_embeds


@torch.no_grad()
def encode_images(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixels in [-1, 1] -> (mean, std) of the VAE's latent distribution, before scaling.

    `AutoencoderTiny` is deterministic (std 0); with no VAE the "latent" is the image itself.
    """
    if vae is None:
        return pixel_values, torch.zeros_like(pixel_values)
    encoded = vae.encode(pixel_values.to(device=vae.device, dtype=vae.dtype))
    if hasattr(encoded, "latent_dist"):
        return encoded.latent_dist.mean.float(), encoded.latent_dist.std.float()
    return encoded.latents.float(), torch.zeros_like(encoded.latents, dtype=torch.float32)


def sample_latents(vae, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw z ~ N(mean, std²) and map it into the model's space: (z - shift_factor) · scaling_factor."""
    noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    z = mean + std * noise
    if vae is None:
        return z
    return (z - (getattr(vae.config, "shift_factor", None) or 0.0)) * vae.config.scaling_factor


def latent_scaling(vae_config: dict | None) -> tuple[float, float]:
    """(shift_factor, scaling_factor) from a VAE config dict (the cache stores it, so training needs no VAE)."""
    if vae_config is None:
        return 0.0, 1.0
    return vae_config.get("shift_factor") or 0.0, vae_config["scaling_factor"]


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], max_length: int) -> dict[str, torch.Tensor]:
    """Captions -> {"text": (N, L, D) token states zeroed at padding, "mask": (N, L), "pooled": (N, D)}.

    Uses the pipeline's own tokenization and pooling, so training conditions the model exactly as sampling does.
    """
    text, mask = encode_text(tokenizer, text_encoder, captions, text_encoder.device, max_length)
    text = text.float() * mask[..., None]
    return {"text": text, "mask": mask.long(), "pooled": pool_prompt_embeds(text, mask, text_encoder)}
