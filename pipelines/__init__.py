"""The diffusers pipeline of latent-dit (installed as `latent_dit.pipelines`)."""

from .pipeline_latent_dit import LatentDiTPipeline

__all__ = ["LatentDiTPipeline"]
