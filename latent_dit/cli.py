"""The `latent-dit` command: generate images (and, in their own modules, train, cache, push, evaluate)."""

import argparse
import sys
from pathlib import Path

from .malloc import keep_freed_memory

# The built-in default model, exported by the project's own training (see README).
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "checkpoints" / "latent-dit-emoji"
DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _pick_device(name: str | None) -> str:
    import torch

    if name:
        return name
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def generate(args) -> list[Path]:
    import torch

    from .components import load_pipeline
    from .tiny import make_tiny_pipeline

    if args.tiny_random:
        print("Building a tiny RANDOM-weight pipeline (no download): the image shows the machinery, not a trained model.")
        pipe = make_tiny_pipeline()
    else:
        model = args.model or str(DEFAULT_MODEL)
        if args.model is None and not DEFAULT_MODEL.is_dir():
            sys.exit(
                f"error: no --model given and the built-in default model ({DEFAULT_MODEL}) is not there.\n"
                "Pass --model PATH_OR_HUB_ID (a folder from `latent-dit train`), or --tiny-random to try the pipeline."
            )
        try:
            pipe = load_pipeline(model, dtype=getattr(torch, args.dtype), allow_pickle=args.allow_pickle)
        except (FileNotFoundError, OSError, ValueError) as error:
            sys.exit(f"error: could not load model {model!r}: {error}")
    pipe.to(_pick_device(args.device))
    generator = torch.Generator("cpu").manual_seed(args.seed)
    try:
        images = pipe(
            args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
            num_inference_steps=args.steps, guidance_scale=args.guidance, guidance_interval=tuple(args.guidance_interval),
            num_images_per_prompt=args.num_images,
            generator=generator,
        ).images
    except ValueError as error:
        sys.exit(f"error: {error}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(len(images))]
    for image, path in zip(images, paths):
        image.save(path)
        print(f"saved {path}")
    return paths


def add_guidance_interval_argument(parser):
    parser.add_argument("--guidance-interval", type=float, nargs=2, default=(0.0, 1.0), metavar=("LOW", "HIGH"),
                        help="Guide only where the noise level (1 = pure noise) is in [LOW, HIGH]; default 0 1: every step.")


def add_generate_parser(subparsers):
    p = subparsers.add_parser("generate", help="Generate images from a prompt.")
    p.add_argument("prompt", help="What to draw.")
    p.add_argument("--model", default=None, help="Pipeline folder or Hub id (default: the built-in model).")
    p.add_argument("--tiny-random", action="store_true", help="Use a tiny random-weight pipeline instead of a model.")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--steps", type=int, default=25, help="Denoising steps.")
    p.add_argument("--guidance", type=float, default=None,
                   help="Classifier-free guidance scale (1 disables it); default: the model's own (4.5 if it names none).")
    add_guidance_interval_argument(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--height", type=int, default=None, help="Pixels; default: the model's training size.")
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--out", default="image.png", help="Output file; several images get -0, -1, ... suffixes.")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available).")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    p.add_argument("--allow-pickle", action="store_true",
                   help="Also load pickled weights (.bin/.pt/.ckpt); they can run code, so only for files you trust.")
    p.set_defaults(func=generate)


def cache(args):
    from .cache import build_cache
    from .components import load_text_encoder, load_vae
    from .config import load_config

    cfg = load_config(args.config, args.overrides)
    if not cfg.data.cache_dir:
        sys.exit("error: set data.cache_dir (in the config or with --set data.cache_dir=PATH) to say where the cache goes.")
    c = cfg.components
    vae = load_vae(c.vae, c.vae_subfolder)
    tokenizer = text_encoder = None
    if cfg.model.conditioning == "text":
        tokenizer, text_encoder = load_text_encoder(c.text_encoder, c.text_encoder_subfolder, c.tokenizer_subfolder)
    path = build_cache(cfg, vae, tokenizer, text_encoder, batch_size=args.batch_size)
    print(f"cache ready: {path}")


def train(args):
    from .train import run

    run(args)


def main(argv=None):
    keep_freed_memory()  # this process is ours: reuse freed memory instead of page-faulting it back every step
    parser = argparse.ArgumentParser(prog="latent-dit", description=__doc__)
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_generate_parser(subparsers)
    from .train import add_train_arguments

    train_parser = subparsers.add_parser("train", help="Train or fine-tune on an image-caption folder.")
    add_train_arguments(train_parser)
    train_parser.set_defaults(func=train)
    cache_parser = subparsers.add_parser("cache", help="Pre-compute VAE latents and text-encoder outputs.")
    cache_parser.add_argument("--config", help="YAML config (the same one training uses).")
    cache_parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cache_parser.add_argument("--batch-size", type=int, default=16, help="Images per encoder batch.")
    cache_parser.set_defaults(func=cache)
    from .evaluate import add_eval_parser

    add_eval_parser(subparsers)
    from .hub import add_push_parser

    add_push_parser(subparsers)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
