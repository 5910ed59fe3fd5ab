"""Train the project's own autoencoder (a small diffusers `AutoencoderTiny`) from scratch on an image folder.

    python scripts/train_autoencoder.py --config configs/autoencoder-emoji.yaml [--set max_steps=200 ...] [--resume latest]
    accelerate launch scripts/train_autoencoder.py --config ...        # several GPUs

Read `main` top to bottom: config -> Accelerator -> images (decoded once, kept in memory as uint8) ->
model, optimizer, LR schedule -> `prepare` -> resume -> one loop (batch, loss, backward, clip, step, log,
checkpoint) -> latent statistics -> export. The export, `<output_dir>/autoencoder`, is a `save_pretrained`
folder (safetensors) that `latent_dit.components.load_vae` and the DiT config's `components.vae` load. Its
`scaling_factor` = 1 / std and `shift_factor` = mean of the latents of training images, so the DiT sees
latents of unit spread; its `reconstruction.json` holds the held-out PSNR.

With `decoder_from` (an exported autoencoder), only a new decoder of `preset`'s sizes trains on that
autoencoder's frozen encoder, as Stability retrained SD's decoder for sd-vae-ft-mse: the latent space,
`scaling_factor` and `shift_factor` stay the source's, so its latent cache and any DiT trained on it keep working.

Each step's batch (which images, which are flipped) is drawn from a generator seeded by (seed, step,
process), so a resumed run repeats the uninterrupted one.
"""

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from tqdm.auto import tqdm

from latent_dit.autoencoder import (build_autoencoder, count_parameters, latent_statistics, psnr, reconstruct,
                                    reconstruction_loss, with_new_decoder)
from latent_dit.checkpointing import TrainState, load_checkpoint, resolve_resume, save_checkpoint
from latent_dit.components import load_vae
from latent_dit import config
from latent_dit.data import open_image, resize_and_crop, scan_dataset, to_rgb
from latent_dit.train import warn_if_emulated_bf16
from latent_dit.validation import image_grid

logger = logging.getLogger("train_autoencoder")


@dataclass
class AutoencoderTrainConfig:
    data: str = ""  # training images: any layout latent_dit.data.scan_dataset reads (e.g. <split>/train)
    heldout: str | None = None  # images for the reported PSNR (e.g. <split>/heldout); null: training images
    resolution: int = 64  # images are resized (shorter side) and centre-cropped to this many pixels
    preset: str = "emoji-f4"  # sizes from latent_dit.autoencoder.PRESETS
    latent_channels: int = 4  # channels of the latent image
    decoder_from: str | None = None  # an exported autoencoder: keep its encoder frozen, train a new `preset` decoder
    use_source_decoder: bool = False  # with decoder_from: fine-tune its decoder (preset of its sizes) instead of a fresh one
    latent_noise: float = 0.0  # with decoder_from: std of noise on the latents the decoder trains on (DiT units: 1 = their spread)
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate autocast; bf16 pays on CPUs with AVX512-BF16/AMX, not on others)
    output_dir: str = "runs/autoencoder"  # checkpoints, logs and the exported `autoencoder/` folder
    seed: int = 0  # seeds init and every batch draw
    max_steps: int = 2000  # optimizer steps
    batch_size: int = 32  # images per process per step
    learning_rate: float = 1e-3  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    warmup_steps: int = 100  # linear warmup, then cosine decay to 0
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    random_flip: bool = True  # horizontal flips of training images
    loss_scales: list[int] = field(default_factory=lambda: [1, 2, 4])  # L1 on the image pooled by each factor
    log_every: int = 25  # steps between loss logs
    checkpoint_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 2  # newest checkpoints kept
    stat_images: int = 512  # training images whose latents set scaling_factor / shift_factor
    eval_images: int = 512  # held-out images for the reported PSNR (at most)


def load_config(path: str | Path | None, overrides: list[str] = ()) -> AutoencoderTrainConfig:
    """YAML file + `key=value` overrides -> typed config; unknown keys and wrong types name the key."""
    return config.load_config(path, overrides, schema=AutoencoderTrainConfig)


def load_images(source: str, resolution: int, limit: int | None = None, show_progress: bool = True) -> torch.Tensor:
    """Every usable image of `source` (scanned by latent_dit.data, so bad files are skipped and counted),
    resized and centre-cropped, as uint8 (N, 3, resolution, resolution)."""
    records, summary, _ = scan_dataset(source, resolution=resolution, show_progress=show_progress)
    logger.info("Data: %s", summary)
    records = records[:limit] if limit else records
    pixels = [np.asarray(resize_and_crop(to_rgb(open_image(r.image))[0], resolution, resolution))
              for r in tqdm(records, desc=f"Loading {source}", unit="img", disable=not show_progress)]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


class EncodeDecode(torch.nn.Module):
    """decode(encode(x)) as one `forward`, so DDP sees the whole pass (`AutoencoderTiny.forward` would round
    the latents to bytes, which lets no gradient through to the encoder).

    With `latent_noise` the decoder sees, in training, latents off by Gaussian noise of that std (in units of
    the latents' spread, what the DiT works in): a DiT's samples are never exact latents of an image, and a
    decoder that has learnt to map near-misses back to clean images draws them sharper.
    """

    def __init__(self, vae, latent_noise: float = 0.0):
        super().__init__()
        self.vae = vae
        self.train_encoder = any(p.requires_grad for p in vae.encoder.parameters())
        self.latent_noise = latent_noise

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.set_grad_enabled(self.train_encoder and torch.is_grad_enabled()):
            latents = self.vae.encode(pixel_values).latents
        if self.training and self.latent_noise > 0:
            latents = latents + torch.randn_like(latents) * (self.latent_noise / self.vae.config.scaling_factor)
        return self.vae.decode(latents).sample


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0  # uint8 -> [-1, 1], the VAE convention


def draw_batch(images: torch.Tensor, cfg: AutoencoderTrainConfig, step: int, process: int) -> torch.Tensor:
    """The batch of one step: its own seeded draw of images (without replacement) and flips."""
    generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 1_009 + process)
    indices = torch.randperm(len(images), generator=generator)[:cfg.batch_size]
    batch = to_model_range(images[indices])
    if cfg.random_flip:
        flip = torch.rand(len(indices), generator=generator) < 0.5
        batch = torch.where(flip[:, None, None, None], batch.flip(-1), batch)
    return batch


@torch.no_grad()
def evaluate_psnr(vae, images: torch.Tensor, batch_size: int = 64) -> tuple[float, torch.Tensor]:
    """Mean PSNR (dB) of decode(encode(x)) over `images` (uint8), and the reconstructions of the first 8."""
    values, first = [], None
    for start in range(0, len(images), batch_size):
        batch = to_model_range(images[start:start + batch_size]).to(vae.device)
        reconstruction = reconstruct(vae, batch)
        values.append(psnr(reconstruction, batch).cpu())
        first = reconstruction[:8].cpu() if first is None else first
    return torch.cat(values).mean().item(), first


def save_comparison(originals: torch.Tensor, reconstructions: torch.Tensor, path: Path):
    """A two-row grid: originals on top, their reconstructions below."""
    from PIL import Image

    rows = torch.cat([to_model_range(originals), reconstructions.clamp(-1, 1)])
    pixels = ((rows + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    image_grid([Image.fromarray(p) for p in pixels], columns=len(originals)).save(path)


def main(cfg: AutoencoderTrainConfig, resume: str | None = None, stop_after: int | None = None,
         show_progress: bool = True) -> dict:
    """Train and export; returns the summary that is also written as reconstruction.json (empty when
    `stop_after` steps ended this invocation, with a checkpoint, before max_steps)."""
    out = Path(cfg.output_dir)
    if cfg.mixed_precision not in ("no", "bf16", "fp16"):
        raise config.ConfigError(f"mixed_precision: {cfg.mixed_precision!r} is not one of no, bf16, fp16")
    if cfg.latent_noise and not cfg.decoder_from:
        raise config.ConfigError("latent_noise needs decoder_from: the latents' spread is known only once an encoder is trained")
    if cfg.use_source_decoder and not cfg.decoder_from:
        raise config.ConfigError("use_source_decoder needs decoder_from: the exported autoencoder whose decoder to fine-tune")
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision, project_config=ProjectConfiguration(project_dir=str(out)))
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    set_seed(cfg.seed)
    warn_if_emulated_bf16(cfg.mixed_precision, accelerator.device)
    show_progress = show_progress and accelerator.is_main_process

    # 1. Images, decoded once: a folder with no usable image fails before anything else.
    if not cfg.data:
        raise config.ConfigError("data: set the training image folder (e.g. --set data=../shared/data/emoji_fluent3d_256)")
    train_images = load_images(cfg.data, cfg.resolution, show_progress=show_progress)
    if len(train_images) < cfg.batch_size:
        raise ValueError(f"{cfg.data} has {len(train_images)} usable images, fewer than batch_size={cfg.batch_size}")
    eval_images = (load_images(cfg.heldout, cfg.resolution, cfg.eval_images, show_progress)
                   if cfg.heldout else train_images[:cfg.eval_images])

    # 2. Model, optimizer, schedule.
    if cfg.decoder_from:
        vae = with_new_decoder(load_vae(cfg.decoder_from), cfg.preset, cfg.use_source_decoder).train()
        logger.info("%s %s decoder (%.2f M parameters) on the frozen encoder of %s",
                    "Fine-tuning the" if cfg.use_source_decoder else "New", cfg.preset,
                    count_parameters(vae.decoder) / 1e6, cfg.decoder_from)
    else:
        vae = build_autoencoder(cfg.preset, cfg.latent_channels).train()
        logger.info("AutoencoderTiny %s: %.2f M parameters", cfg.preset, count_parameters(vae) / 1e6)
    model = EncodeDecode(vae.to(memory_format=torch.channels_last), cfg.latent_noise)  # NHWC: ~1.5x faster convolutions on CPU
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    lr_scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=cfg.warmup_steps * accelerator.num_processes,
                                 num_training_steps=cfg.max_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    state = TrainState()
    accelerator.register_for_checkpointing(state)
    config_yaml = config.to_yaml(cfg)

    # 3. Resume exactly where a checkpoint stopped.
    checkpoint = resolve_resume(out, resume)
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint)
        logger.info("Resumed from %s at step %d", checkpoint, state.step)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(config_yaml)

    # 4. The loop.
    start_step, start_time = state.step, time.time()
    losses, loss_sum, loss_count = {}, torch.zeros((), device=accelerator.device), 0
    progress = tqdm(total=cfg.max_steps, initial=state.step, desc="Training autoencoder", disable=not show_progress)
    while state.step < cfg.max_steps and not (stop_after and state.step - start_step >= stop_after):
        batch = draw_batch(train_images, cfg, state.step, accelerator.process_index).to(accelerator.device)
        reconstruction = model(batch.contiguous(memory_format=torch.channels_last))
        loss = reconstruction_loss(reconstruction.float(), batch, cfg.loss_scales)
        accelerator.backward(loss)
        if cfg.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        loss_sum += loss.detach()
        loss_count += 1
        progress.update(1)
        if state.step % cfg.log_every == 0 or state.step == cfg.max_steps:
            mean_loss = accelerator.reduce(loss_sum / loss_count, "mean").item()
            losses[state.step] = mean_loss
            progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}")
            if accelerator.is_main_process:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps({"step": state.step, "loss": mean_loss, "lr": lr_scheduler.get_last_lr()[0]}) + "\n")
            loss_sum.zero_()
            loss_count = 0
        if state.step % cfg.checkpoint_every == 0 or state.step == cfg.max_steps or state.step - start_step == stop_after:
            save_checkpoint(accelerator, out, state.step, keep_last=cfg.keep_checkpoints, extra_files={"config.yaml": config_yaml})
    progress.close()
    seconds = time.time() - start_time

    # 5. Latent statistics -> scaling_factor / shift_factor; held-out PSNR; export.
    summary = {}
    if accelerator.is_main_process and state.step >= cfg.max_steps:
        vae = accelerator.unwrap_model(model).vae.eval().to(memory_format=torch.contiguous_format)
        if cfg.decoder_from:  # the source's latent space, so its factors (copied by with_new_decoder)
            mean, std = vae.config.shift_factor, 1.0 / vae.config.scaling_factor
        else:
            stat_generator = torch.Generator().manual_seed(cfg.seed)
            stat_indices = torch.randperm(len(train_images), generator=stat_generator)[:cfg.stat_images]
            mean, std = latent_statistics(vae, to_model_range(train_images[stat_indices]))
            vae.register_to_config(scaling_factor=1.0 / std, shift_factor=mean)
        heldout_psnr, reconstructions = evaluate_psnr(vae, eval_images)
        summary = {
            "psnr": round(heldout_psnr, 3), "psnr_on": "heldout" if cfg.heldout else "train",
            "psnr_images": len(eval_images), "resolution": cfg.resolution, "preset": cfg.preset,
            "parameters": count_parameters(vae), "latent_mean": mean, "latent_std": std,
            "scaling_factor": 1.0 / std, "shift_factor": mean, "steps": state.step,
            "steps_this_run": state.step - start_step, "seconds": round(seconds, 1),
            "final_loss": losses[max(losses)] if losses else None, "data": cfg.data, "heldout": cfg.heldout,
            "decoder_from": cfg.decoder_from, "use_source_decoder": cfg.use_source_decoder,
            "latent_noise": cfg.latent_noise, "mixed_precision": cfg.mixed_precision,
        }
        export_dir = out / "autoencoder"
        vae.save_pretrained(export_dir, safe_serialization=True)
        (export_dir / "reconstruction.json").write_text(json.dumps(summary, indent=2) + "\n")
        save_comparison(eval_images[:8], reconstructions, out / "reconstructions.png")
        print(f"\nautoencoder: {export_dir}  PSNR {summary['psnr']:.2f} dB on {len(eval_images)} {summary['psnr_on']} "
              f"images at {cfg.resolution}px; scaling_factor {1 / std:.4f}, shift_factor {mean:.4f}")
    accelerator.end_training()
    return summary


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML config (see configs/autoencoder-emoji.yaml).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config value, e.g. --set max_steps=200 (repeatable).")
    parser.add_argument("--resume", default=None, help='"latest" or a checkpoint folder.')
    parser.add_argument("--stop-after", type=int, default=None, help="Checkpoint and stop after this many steps.")
    return parser.parse_args(argv)


if __name__ == "__main__":
    args = parse_args()
    try:
        main(load_config(args.config, args.overrides), resume=args.resume, stop_after=args.stop_after)
    except config.ConfigError as error:
        sys.exit(f"error: {error}")
