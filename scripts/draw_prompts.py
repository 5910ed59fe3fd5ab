"""Draw a row of prompts with one model into one grid image (used for the README's pictures).

    python scripts/draw_prompts.py --out docs/images/unseen-prompts.png "a shiny red apple" "a smiling yellow face"
"""

import argparse

import torch

from latent_dit.components import load_pipeline
from latent_dit.cli import DEFAULT_MODEL
from latent_dit.validation import image_grid


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts", nargs="+")
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=4.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=int, default=2, help="Upscale the grid (nearest) for display.")
    args = parser.parse_args()
    pipe = load_pipeline(args.model)
    images = [pipe(prompt, num_inference_steps=args.steps, guidance_scale=args.guidance,
                   generator=torch.Generator().manual_seed(args.seed)).images[0] for prompt in args.prompts]
    grid = image_grid(images)
    grid = grid.resize((grid.width * args.scale, grid.height * args.scale), resample=0)
    grid.save(args.out)
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()
