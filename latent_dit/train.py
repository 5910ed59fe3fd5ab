"""The training loop: `latent-dit train --config configs/NAME.yaml` or `accelerate launch -m latent_dit.train ...`.

Read `main` top to bottom: config -> Accelerator -> data (or the latent cache) -> frozen VAE and text
encoder -> model, EMA, optimizer -> `prepare` -> resume -> one loop (accumulate, backward, clip, step,
EMA, log / sample / checkpoint every N steps) -> export a pipeline folder. The same code runs on one
CPU, one GPU, or many GPUs (DDP/FSDP) under Accelerate.

Every random draw of a micro-step (latent sample, caption dropout, timesteps, noise) comes from a
generator seeded by (seed, micro-step, process), so a resumed run repeats the uninterrupted one exactly.
"""

import argparse
import contextlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from .cache import CachedDataset, cache_fingerprint, check_cacheable, collate_cached
from .checkpointing import (
    TrainState, check_same_model, install_signal_handlers, load_checkpoint, resolve_resume, save_checkpoint,
)
from .components import load_text_encoder, load_vae, text_embed_dim, vae_latent_channels, vae_scale_factor
from .config import Config, ConfigError, load_config, model_differences, to_yaml, transformer_kwargs
from .data import BucketBatchSampler, ImageCaptionDataset, collate, make_buckets, scan_dataset
from .encoding import encode_captions, encode_images, latent_scaling
from .export import export_pipeline
from .hub import CheckpointPusher, check_can_push, push_after_training
from .malloc import keep_freed_memory
from .model import LatentDiTTransformer2DModel
from .objective import build_objective
from .pipelines.pipeline_latent_dit import trim_padding
from .validation import log_validation

logger = logging.getLogger(__name__)


class FrozenComponents:
    """The VAE, tokenizer and text encoder, loaded on first use: a cached run needs them only to sample and export."""

    def __init__(self, cfg: Config, device, dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self._loaded = None

    def get(self):
        if self._loaded is None:
            c = self.cfg.components
            vae = load_vae(c.vae, c.vae_subfolder, dtype=self.dtype)
            tokenizer = text_encoder = None
            if self.cfg.model.conditioning == "text":
                tokenizer, text_encoder = load_text_encoder(c.text_encoder, c.text_encoder_subfolder, c.tokenizer_subfolder, dtype=self.dtype)
                text_encoder.to(self.device)
            self._loaded = (vae.to(self.device) if vae is not None else None, tokenizer, text_encoder)
        return self._loaded


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: without either, PyTorch emulates bf16 arithmetic on the CPU."""
    return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()


def warn_if_emulated_bf16(mixed_precision: str, device: torch.device) -> str | None:
    """bf16 autocast pays on a CPU with native bf16 (about 1.8x per DiT step) but is an order of magnitude
    slower on one without (an AVX2-only CPU: the emoji decoder took 18.4 s a step in bf16 against 1.5 s in
    float32). Say so, with the fix, instead of training for hours; returns the warning given, if any."""
    if mixed_precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16():
        return None
    message = ("mixed_precision bf16 on a CPU without native bf16 (no AVX512-BF16 or AMX): PyTorch emulates it, "
               "about 10x slower than float32 here. Set mixed_precision: no (--set train.mixed_precision=no) "
               "unless this run is meant for a GPU.")
    logger.warning(message)
    return message


def use_pipeline_components(cfg: Config):
    """Fine-tuning: take the VAE, tokenizer and text encoder from the `init_from` pipeline folder or repo."""
    source = cfg.train.init_from
    index_path = Path(source, "model_index.json")
    if not index_path.is_file():
        from huggingface_hub import hf_hub_download

        index_path = Path(hf_hub_download(source, "model_index.json"))
    index = json.loads(index_path.read_text())
    has_vae = index.get("vae", [None])[0] is not None
    cfg.components.vae, cfg.components.vae_subfolder = (source, "vae") if has_vae else (None, None)
    cfg.components.text_encoder, cfg.components.text_encoder_subfolder = source, "text_encoder"
    cfg.components.tokenizer_subfolder = "tokenizer"


@contextlib.contextmanager
def full_parameters(accelerator, model):
    """The trained weights at full shape on every process (for the EMA): outside forward, FSDP (with
    use_orig_params) leaves each process only its shard, so gather them for the duration."""
    if accelerator.distributed_type == DistributedType.FSDP:
        from torch.distributed.fsdp import FullyShardedDataParallel

        with FullyShardedDataParallel.summon_full_params(model, writeback=False):
            yield list(accelerator.unwrap_model(model).parameters())
    else:
        yield list(accelerator.unwrap_model(model).parameters())


def micro_step_generator(seed: int, micro_step: int, process: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + micro_step * 1_009 + process)


def training_inputs(batch: dict, frozen: dict, objective, cfg: Config, generator: torch.Generator) -> dict:
    """One batch (images + captions, or cached encodings) -> the model's inputs and the clean latents/noise.

    `frozen` holds what this step needs: "vae"/"tokenizer"/"text_encoder" (uncached) or nothing (cached),
    plus "shift_scale", "null_text" and "num_classes". Cached and uncached batches give identical inputs.
    """
    device = generator.device
    if "latent_mean" in batch:
        mean, std = batch["latent_mean"].to(device, non_blocking=True), batch["latent_std"].to(device, non_blocking=True)
    else:
        mean, std = encode_images(frozen["vae"], batch["pixel_values"].to(device, non_blocking=True))
    shift, scale = frozen["shift_scale"]
    noise_for_latents = torch.randn(mean.shape, generator=generator, device=device)
    latents = (mean + std * noise_for_latents - shift) * scale
    n = latents.shape[0]
    drop = torch.rand(n, generator=generator, device=device) < cfg.data.caption_dropout  # classifier-free guidance

    conditioning = {}
    if cfg.model.conditioning == "text":
        text = batch if "text" in batch else encode_captions(frozen["tokenizer"], frozen["text_encoder"], batch["caption"], cfg.data.max_text_length)
        null = frozen["null_text"]
        # Token columns that neither a caption of this batch nor the null caption uses are masked out of
        # cross-attention: dropping them changes nothing but the cost (captions are ~10-20 of CLIP's 77 tokens).
        # Cached masks are still on the CPU here (the loader leaves batches there), so finding the length costs
        # no device sync (uncached ones come from the text encoder on the device: one sync per step). With
        # use_compile, torch.compile marks the length dynamic after its first change: one recompile, not one per length.
        (tokens, mask), (null_tokens, null_mask) = trim_padding((text["text"], text["mask"]), (null["text"][None], null["mask"][None]))
        pairs = {"encoder_hidden_states": (tokens, null_tokens[0]), "encoder_attention_mask": (mask, null_mask[0]),
                 "pooled_projections": (text["pooled"], null["pooled"])}
        for model_key, (value, null_value) in pairs.items():
            value = value.to(device, non_blocking=True)
            keep = ~drop.view(-1, *([1] * (value.ndim - 1)))
            conditioning[model_key] = torch.where(keep, value, null_value.to(device))
    elif cfg.model.conditioning == "class":
        labels = batch["class_label"].to(device)
        conditioning["class_labels"] = torch.where(drop, torch.full_like(labels, frozen["num_classes"]), labels)

    noise = torch.randn(latents.shape, generator=generator, device=device)
    timesteps = objective.sample_timesteps(n, generator=generator, device=device)
    return {"latents": latents, "noise": noise, "timesteps": timesteps,
            "noisy_latents": objective.add_noise(latents, noise, timesteps), "conditioning": conditioning}


def cached_parts(dataset: CachedDataset, num_classes: int) -> tuple[dict, int, int, int | None]:
    """What a cached run needs of the encoders, read from the cache's manifest: the step's frozen inputs
    (null caption, latent scaling, class count), the latent channels, the VAE scale factor and the text width."""
    vae_config, text_dim = dataset.manifest["vae_config"], dataset.manifest["text_embed_dim"]
    frozen = {"num_classes": num_classes, "null_text": dataset.null_text, "shift_scale": latent_scaling(vae_config)}
    if vae_config is None:  # pixel space
        return frozen, 3, 1, text_dim
    return frozen, vae_config["latent_channels"], 2 ** (len(vae_config["block_out_channels"]) - 1), text_dim


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """train.mixed_precision as the dtype Accelerate autocasts to (None for "no")."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def build_model(cfg: Config, in_channels: int, latent_size: int, text_dim: int | None, num_classes: int) -> LatentDiTTransformer2DModel:
    """The DiT to train: the `init_from` pipeline's transformer, or a fresh one sized by `cfg.model` and the data."""
    if cfg.train.init_from:
        model = LatentDiTTransformer2DModel.from_pretrained(cfg.train.init_from, subfolder="transformer")
    else:
        model = LatentDiTTransformer2DModel(
            **transformer_kwargs(cfg.model), in_channels=in_channels, sample_size=latent_size,
            text_embed_dim=text_dim or 512, num_classes=max(num_classes, 1),
        )
    if cfg.train.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def resume_hint(checkpoint: Path, cfg: Config) -> str:
    """The overrides that rebuild the checkpoint's model, from the config.yaml saved in it (if readable)."""
    saved = Path(checkpoint, "config.yaml")
    try:
        overrides = model_differences(saved, cfg.model) if saved.is_file() and not cfg.train.init_from else []
    except ConfigError:  # written by another version of latent-dit
        overrides = []
    return f"Its config.yaml has other model settings: add {' '.join('--set ' + o for o in overrides)}." if overrides else ""


def build_optimizer(model: torch.nn.Module, tc) -> torch.optim.Optimizer:
    # fused=True: one vectorised kernel per parameter tensor instead of ~10 elementwise ops (CPU and CUDA).
    return torch.optim.AdamW(model.parameters(), lr=tc.learning_rate, weight_decay=tc.weight_decay, fused=True)


def make_objective(cfg: Config):
    tc = cfg.train
    return build_objective(cfg.model.prediction_type, beta_schedule=tc.beta_schedule, snr_gamma=tc.snr_gamma,
                           logit_normal_mean=tc.logit_normal_mean, logit_normal_std=tc.logit_normal_std)


def image_dataset(cfg: Config, records: list, scale_factor: int) -> ImageCaptionDataset:
    """The scanned records as pixel tensors, with bucket ids when aspect-ratio bucketing is on."""
    patch = transformer_kwargs(cfg.model)["patch_size"]
    buckets = make_buckets(cfg.data.resolution, scale_factor * patch) if cfg.data.use_buckets else None
    return ImageCaptionDataset(
        records, resolution=cfg.data.resolution, center_crop=cfg.data.center_crop, random_flip=cfg.data.random_flip,
        buckets=buckets, source=cfg.data.source, image_column=cfg.data.image_column, split=cfg.data.split, seed=cfg.train.seed,
    )


def main(cfg: Config, resume: str | None = None, stop_after: int | None = None) -> dict:
    """Train; returns the run summary. `resume`: "latest" or a checkpoint folder. `stop_after`: end this
    invocation (with a checkpoint) after that many steps, e.g. to fit a job's time limit."""
    tc = cfg.train
    out = Path(tc.output_dir)
    if tc.push_to_hub:
        check_can_push(tc.hub_repo)  # a missing repo name or token fails now, not after training
    if tc.init_from:
        use_pipeline_components(cfg)
    accelerator = Accelerator(
        # Under torchrun without a GPU, Accelerate sets up gloo only when told to use the CPU; otherwise
        # every process would train alone, all writing the same run folder.
        cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1,
        mixed_precision=tc.mixed_precision,
        gradient_accumulation_steps=tc.gradient_accumulation_steps,
        log_with=None if tc.report_to == "none" else tc.report_to,
        project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs")),
    )
    logging.basicConfig(level=logging.INFO if accelerator.is_main_process else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    set_seed(tc.seed)
    device = accelerator.device
    warn_if_emulated_bf16(tc.mixed_precision, device)
    frozen_dtype = autocast_dtype(tc.mixed_precision) or torch.float32
    components = FrozenComponents(cfg, device, frozen_dtype)

    # 1. Data first, so a folder with no usable image fails before any model loads.
    cached = bool(cfg.data.cache_dir) and Path(cfg.data.cache_dir, "manifest.json").is_file()
    if cached:
        check_cacheable(cfg)
        dataset = CachedDataset(cfg.data.cache_dir, cache_fingerprint(cfg))
        class_names, data_summary = dataset.manifest["class_names"], dataset.manifest["summary"]
    else:  # scanned: bad files are skipped and counted
        records, data_summary, class_names = scan_dataset(
            cfg.data.source, image_column=cfg.data.image_column, caption_column=cfg.data.caption_column,
            split=cfg.data.split, class_folders=cfg.data.class_folders, empty_caption=cfg.data.empty_caption,
            resolution=cfg.data.resolution, show_progress=accelerator.is_local_main_process,
        )
        data_summary = str(data_summary)
    logger.info("Data: %s%s", data_summary, " (from the latent cache)" if cached else "")
    if cfg.model.conditioning == "class" and not class_names:
        raise ValueError("model.conditioning=class needs class-labelled data: set data.class_folders=true (one sub-folder per class).")

    # 2. Frozen parts of the step: encoders (uncached only), latent scaling, the null caption.
    if cached:
        frozen, in_channels, scale_factor, text_dim = cached_parts(dataset, len(class_names or []))
    else:
        vae, tokenizer, text_encoder = components.get()
        scale_factor = vae_scale_factor(vae)
        dataset = image_dataset(cfg, records, scale_factor)
        frozen = {"num_classes": len(class_names or []), "vae": vae, "tokenizer": tokenizer, "text_encoder": text_encoder,
                  "shift_scale": latent_scaling(None if vae is None else dict(vae.config))}
        if text_encoder is not None:
            frozen["null_text"] = {k: v[0] for k, v in encode_captions(tokenizer, text_encoder, [""], cfg.data.max_text_length).items()}
        text_dim = text_embed_dim(text_encoder) if text_encoder is not None else None
        in_channels = vae_latent_channels(vae)
    bucket_ids, collate_fn = dataset.bucket_ids, collate_cached if cached else collate

    # 3. Model, EMA, optimizer, LR schedule, objective.
    model = build_model(cfg, in_channels, cfg.data.resolution // scale_factor, text_dim, len(class_names or []))
    checkpoint = resolve_resume(out, resume)
    if checkpoint is not None:  # a config that builds another model fails here, with the settings to fix
        check_same_model(checkpoint, model, hint=resume_hint(checkpoint, cfg))
    # foreach: one vectorised update over all tensors instead of a Python loop (12 M params on CPU: 6.5 vs 15.5 ms).
    ema = EMAModel(model.parameters(), decay=tc.ema_decay, foreach=True, model_cls=LatentDiTTransformer2DModel, model_config=model.config)
    ema.to(device)
    optimizer = build_optimizer(model, tc)
    # Accelerate steps a prepared scheduler once per process per optimizer step, hence the factor.
    lr_scheduler = get_scheduler(
        "cosine" if tc.lr_schedule == "cosine" else "constant_with_warmup", optimizer,
        num_warmup_steps=tc.warmup_steps * accelerator.num_processes, num_training_steps=tc.max_steps * accelerator.num_processes,
    )
    objective = make_objective(cfg)
    sampler = BucketBatchSampler(bucket_ids, tc.batch_size, seed=tc.seed)
    dataloader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=0 if cached else cfg.data.num_workers,
        pin_memory=torch.cuda.is_available(),
    )
    if tc.use_compile:  # regional compilation: one block compiled, its code reused by all (minutes sooner than the whole model)
        model.compile_repeated_blocks()
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    # Batches stay on the CPU (pinned on a GPU machine) until `training_inputs` moves them: caption lengths are
    # read there without a device sync, next to the cached null caption, which is on the CPU too.
    dataloader = accelerator.prepare_data_loader(dataloader, device_placement=False)
    state = TrainState()
    accelerator.register_for_checkpointing(ema, state)

    # 4. Resume exactly where a checkpoint stopped (weights, EMA, optimizer, LR, step, data position).
    if checkpoint is not None:
        load_checkpoint(accelerator, checkpoint)
        logger.info("Resumed from %s at step %d", checkpoint, state.step)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(to_yaml(cfg))
        accelerator.init_trackers("latent-dit", config={k: str(v) for k, v in vars(tc).items()})

    pusher = CheckpointPusher(tc.hub_repo) if tc.push_to_hub and tc.push_checkpoints and accelerator.is_main_process else None

    def checkpoint_now():
        path = save_checkpoint(accelerator, out, state.step, keep_last=tc.keep_checkpoints, extra_files={"config.yaml": to_yaml(cfg)})
        if pusher is not None:
            pusher.submit(path)  # uploads in the background to the repo's "checkpoints" branch

    def sample_now():
        vae, tokenizer, text_encoder = components.get()
        log_validation(accelerator, accelerator.unwrap_model(model), ema, vae, tokenizer, text_encoder, cfg, state.step, out)

    # 5. The loop.
    stop = install_signal_handlers()
    start_step, start_time = state.step, time.time()
    losses, loss_sum, loss_count = {}, torch.zeros((), device=device), 0
    progress = tqdm(total=tc.max_steps, initial=state.step, desc="Training", disable=not accelerator.is_main_process)
    metrics_file = out / "metrics.jsonl"
    stop_here = False
    while state.step < tc.max_steps and not stop_here:
        sampler.set_epoch(state.epoch)
        dataset.set_epoch(state.epoch)
        epoch_loader = accelerator.skip_first_batches(dataloader, state.batch_in_epoch) if state.batch_in_epoch else dataloader
        # Accelerate's loader re-seeds the sampler and dataset with its own pass count at each `iter`; make
        # that count the run's epoch, or a resumed run would replay epoch 0's order.
        epoch_loader.set_epoch(state.epoch)
        for batch in epoch_loader:
            generator = micro_step_generator(tc.seed, state.micro_step, accelerator.process_index, device)
            with accelerator.accumulate(model):
                inputs = training_inputs(batch, frozen, objective, cfg, generator)
                prediction = model(inputs["noisy_latents"], inputs["timesteps"], **inputs["conditioning"]).sample
                loss = objective.loss(prediction, inputs["latents"], inputs["noise"], inputs["timesteps"])
                accelerator.backward(loss)
                if accelerator.sync_gradients and tc.max_grad_norm > 0:
                    accelerator.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            state.micro_step += 1
            state.batch_in_epoch += 1
            loss_sum += loss.detach()
            loss_count += 1
            if not accelerator.sync_gradients:
                continue

            state.step += 1
            with full_parameters(accelerator, model) as parameters:
                ema.step(parameters)
            progress.update(1)
            if state.step % tc.log_every == 0 or state.step == tc.max_steps:
                mean_loss = accelerator.reduce(loss_sum / loss_count, "mean").item()  # the only host sync of a cached run
                losses[state.step] = mean_loss
                lr = lr_scheduler.get_last_lr()[0]
                accelerator.log({"train/loss": mean_loss, "train/lr": lr}, step=state.step)
                progress.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}")
                if accelerator.is_main_process:
                    with metrics_file.open("a") as f:
                        seconds = round(time.time() - start_time, 3)  # since this invocation's loop began
                        f.write(json.dumps({"step": state.step, "loss": mean_loss, "lr": lr, "seconds": seconds}) + "\n")
                loss_sum.zero_()
                loss_count = 0
            if tc.validate_every and state.step % tc.validate_every == 0:
                sample_now()
            # A signal on any process stops all of them at the same step (polling syncs, so only at the log cadence).
            signalled = (accelerator.num_processes == 1 or state.step % tc.log_every == 0) and stop.requested_on_any_process(accelerator)
            stop_here = signalled or (stop_after is not None and state.step - start_step >= stop_after)
            if state.step % tc.checkpoint_every == 0 or state.step == tc.max_steps or stop_here:
                checkpoint_now()
            if state.step >= tc.max_steps or stop_here:
                break
        else:
            state.epoch += 1
            state.batch_in_epoch = 0
    progress.close()
    stop.restore()
    elapsed = time.time() - start_time  # the loop only: images_per_second is training throughput

    # 6. Export the EMA weights as a complete pipeline folder, and summarise.
    pipeline_dir = None
    if state.step >= tc.max_steps:
        if tc.validate_every and state.step % tc.validate_every:
            sample_now()
        vae, tokenizer, text_encoder = components.get()
        pipeline_dir = export_pipeline(accelerator, accelerator.unwrap_model(model), ema, vae, tokenizer, text_encoder, cfg, out)
    if pusher is not None:
        pusher.close()  # let the queued checkpoint uploads finish
    if pipeline_dir is not None and tc.push_to_hub and accelerator.is_main_process:
        push_after_training(pipeline_dir, tc.hub_repo)  # on failure: logs how to push later; the folder stays
    steps_done = state.step - start_step
    summary = {
        "steps": state.step, "steps_this_run": steps_done, "seconds": round(elapsed, 1),
        "images_per_second": round(steps_done * tc.batch_size * tc.gradient_accumulation_steps * accelerator.num_processes / max(elapsed, 1e-9), 2),
        "final_loss": losses[max(losses)] if losses else None, "losses": losses, "data": data_summary,
        "cached": cached, "pipeline": str(pipeline_dir) if pipeline_dir else None,
        "interrupted": state.step < tc.max_steps,
    }
    accelerator.end_training()
    if accelerator.is_main_process:
        print_summary(summary, out)
    return summary


def print_summary(summary: dict, out: Path):
    print("\n=== latent-dit run summary ===")
    for key in ("steps", "steps_this_run", "seconds", "images_per_second", "final_loss", "cached", "pipeline", "interrupted"):
        print(f"{key:>18}: {summary[key]}")
    print(f"{'data':>18}: {summary['data']}")
    if summary["interrupted"]:
        print(f"Stopped before max_steps: continue with `latent-dit train ... --resume latest` (checkpoints in {out / 'checkpoints'}).")


def add_train_arguments(parser: argparse.ArgumentParser):
    parser.add_argument("--config", help="YAML config (see configs/).")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="Override a config value, e.g. --set train.learning_rate=3e-4 (repeatable).")
    parser.add_argument("--resume", default=None, help='"latest" or a checkpoint folder.')
    parser.add_argument("--init-from", default=None, help="Pipeline folder or Hub id to fine-tune.")
    parser.add_argument("--stop-after", type=int, default=None, help="Checkpoint and stop after this many steps.")


def run(args) -> dict:
    overrides = list(args.overrides) + ([f"train.init_from={args.init_from}"] if args.init_from else [])
    return main(load_config(args.config, overrides), resume=args.resume, stop_after=args.stop_after)


if __name__ == "__main__":  # accelerate launch -m latent_dit.train / torchrun -m latent_dit.train
    keep_freed_memory()  # this process is ours: reuse freed memory instead of page-faulting it back every step
    parser = argparse.ArgumentParser(prog="latent_dit.train", description=__doc__)
    add_train_arguments(parser)
    run(parser.parse_args())
