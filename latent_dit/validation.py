"""Validation during training: sample fixed prompts (or class labels) with the EMA weights into an image grid."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .components import build_pipeline
from .model import LatentDiTTransformer2DModel
from .objective import build_inference_scheduler


def image_grid(images: list[Image.Image], columns: int | None = None) -> Image.Image:
    columns = columns or len(images)
    rows = -(-len(images) // columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * width, (i // columns) * height))
    return grid


def ema_copy(model, ema, device) -> LatentDiTTransformer2DModel:
    """A plain model (not wrapped by DDP/FSDP, nor sharded) holding the EMA weights, for sampling and export."""
    copy = LatentDiTTransformer2DModel.from_config(model.config).to(device)
    ema.copy_to(copy.parameters())
    return copy.eval()


def sampling_pipeline(model, vae, tokenizer, text_encoder, cfg):
    scheduler = build_inference_scheduler(cfg.model.prediction_type, beta_schedule=cfg.train.beta_schedule)
    pipe = build_pipeline(model, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder, scheduler=scheduler,
                          guidance_scale=cfg.train.guidance_scale)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def sample_validation_images(pipe, cfg, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """One image per validation prompt (or class label), same seed every time so grids are comparable."""
    generator = torch.Generator("cpu").manual_seed(seed)
    kwargs = dict(num_inference_steps=cfg.train.validation_steps, guidance_scale=cfg.train.guidance_scale, generator=generator)
    mode = cfg.model.conditioning
    if mode == "text":
        titles = list(cfg.train.validation_prompts)
        images = pipe(prompt=titles, **kwargs).images
    elif mode == "class":
        labels = [label % pipe.transformer.config.num_classes for label in cfg.train.validation_class_labels]
        titles = [f"class {label}" for label in labels]
        images = pipe(class_labels=labels, **kwargs).images
    else:
        titles = ["unconditional"] * 4
        images = pipe(num_images_per_prompt=4, **kwargs).images
    return images, titles


def log_validation(accelerator, model, ema, vae, tokenizer, text_encoder, cfg, step: int, out: Path):
    """Sample with the EMA weights, save `samples/step-XXXXXXX.png`, and log it to the trackers.

    A copy of the model samples, not the trained one: under FSDP that one holds only this process's shard.
    """
    if accelerator.is_main_process:
        pipe = sampling_pipeline(ema_copy(model, ema, accelerator.device), vae, tokenizer, text_encoder, cfg)
        images, titles = sample_validation_images(pipe, cfg)
        grid = image_grid(images)
        path = out / "samples" / f"step-{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        (path.with_suffix(".txt")).write_text("\n".join(titles) + "\n")
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.writer.add_image("validation", np.asarray(grid), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=t) for im, t in zip(images, titles)]}, step=step)
    accelerator.wait_for_everyone()
