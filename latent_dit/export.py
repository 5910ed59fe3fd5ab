"""Export at the end of training: the EMA weights as a complete pipeline folder in diffusers layout."""

import shutil
from pathlib import Path

from .config import to_yaml
from .model import LatentDiTTransformer2DModel
from .validation import sample_validation_images, image_grid, sampling_pipeline


def export_pipeline(accelerator, model, ema, vae, tokenizer, text_encoder, cfg, out: Path) -> Path | None:
    """Write `out/pipeline` (model_index.json, one folder per component, safetensors only) atomically."""
    pipeline_dir = out / "pipeline"
    if accelerator.is_main_process:
        export_model = LatentDiTTransformer2DModel.from_config(model.config)
        ema.copy_to(export_model.parameters())
        pipe = sampling_pipeline(export_model.eval(), vae, tokenizer, text_encoder, cfg)
        tmp = out / "pipeline.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        pipe.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training_config.yaml").write_text(to_yaml(cfg))
        images, titles = sample_validation_images(pipe, cfg)
        image_grid(images).save(tmp / "samples.png")
        (tmp / "samples.txt").write_text("\n".join(titles) + "\n")
        shutil.rmtree(pipeline_dir, ignore_errors=True)
        tmp.rename(pipeline_dir)
    accelerator.wait_for_everyone()
    return pipeline_dir
