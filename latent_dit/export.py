"""Export at the end of training: the EMA weights as a complete pipeline folder in diffusers layout."""

import shutil
from pathlib import Path

from .config import to_yaml
from .hub import prepare_for_hub
from .model_card import hub_id_or_none
from .validation import ema_copy, image_grid, sample_validation_images, sampling_pipeline


def export_pipeline(accelerator, model, ema, vae, tokenizer, text_encoder, cfg, out: Path) -> Path | None:
    """Write `out/pipeline` atomically: model_index.json, one folder per component (safetensors only), the
    training config, a sample grid, and what `hub.prepare_for_hub` adds (model card, code for plain diffusers)."""
    pipeline_dir = out / "pipeline"
    if accelerator.is_main_process:
        # On the frozen parts' device, so that the sample grid below can be drawn on a GPU.
        pipe = sampling_pipeline(ema_copy(model, ema, accelerator.device), vae, tokenizer, text_encoder, cfg)
        tmp = out / "pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_config.yaml").write_text(to_yaml(cfg))
        images, titles = sample_validation_images(pipe, cfg)
        image_grid(images).save(tmp / "samples.png")
        (tmp / "samples.txt").write_text("\n".join(titles) + "\n")
        # Model card, and the code that lets plain diffusers load the folder (trust_remote_code=True).
        source = hub_id_or_none(cfg.data.source)
        prepare_for_hub(tmp, repo_id=cfg.train.hub_repo, base_model=hub_id_or_none(cfg.train.init_from),
                        datasets=[source] if source else [], draw_samples=False)
        shutil.rmtree(pipeline_dir, ignore_errors=True)
        tmp.rename(pipeline_dir)
    accelerator.wait_for_everyone()
    return pipeline_dir
