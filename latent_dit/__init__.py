"""latent-dit: a readable text-to-image latent diffusion transformer with a diffusers pipeline."""

import diffusers

from .model import PRESETS, LatentDiTTransformer2DModel
from .pipelines import LatentDiTPipeline

# `DiffusionPipeline.from_pretrained(dir)` resolves model_index.json's "_class_name" by looking it up
# on the `diffusers` module itself; registering our classes there makes the generic loader work.
for _cls in (LatentDiTPipeline, LatentDiTTransformer2DModel):
    setattr(diffusers, _cls.__name__, _cls)

# A folder shared on the Hub also carries copies of our code for plain diffusers (trust_remote_code=True);
# with latent-dit installed, diffusers takes the installed classes instead (see hub.py).
from .hub import connect_to_diffusers  # noqa: E402

connect_to_diffusers()

__all__ = ["PRESETS", "LatentDiTPipeline", "LatentDiTTransformer2DModel"]
__version__ = "0.1.0"
