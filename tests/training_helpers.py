"""Helpers shared by the training, cache and distributed tests: tiny frozen components saved to disk,
small PIL-drawn image-caption folders in each layout, and a tiny training config that points at them.

Everything is CPU-sized: 16-px images, a depth-2 width-32 DiT, a 2-level AutoencoderKL and a two-layer
CLIP text encoder, so a few hundred optimizer steps take seconds.
"""

import importlib.util
import json
import os
import socket
import sys
from pathlib import Path

import yaml
from PIL import Image, ImageDraw

from latent_dit.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent

# (name, fill colour, shape): distinct enough that a tiny model can tell them apart from the caption.
SHAPES = [
    ("red circle", (220, 30, 30), "ellipse"),
    ("green square", (30, 180, 60), "rectangle"),
    ("blue circle", (40, 60, 220), "ellipse"),
    ("yellow square", (235, 200, 20), "rectangle"),
    ("purple circle", (150, 40, 180), "ellipse"),
    ("orange square", (250, 130, 20), "rectangle"),
    ("pink circle", (240, 120, 200), "ellipse"),
    ("cyan square", (20, 200, 220), "rectangle"),
]


def draw(color, shape: str, size: int = 24) -> Image.Image:
    image = Image.new("RGB", (size, size), "white")
    box = [size // 6, size // 6, size - size // 6 - 1, size - size // 6 - 1]
    getattr(ImageDraw.Draw(image), shape)(box, fill=color)
    return image


def file_name(caption: str) -> str:
    return caption.replace(" ", "_") + ".png"


def make_imagefolder(folder: Path, count: int = 4, metadata: str = "jsonl") -> Path:
    """`datasets` imagefolder layout: images plus metadata.jsonl (or metadata.csv)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for caption, color, shape in SHAPES[:count]:
        draw(color, shape).save(folder / file_name(caption))
        rows.append({"file_name": file_name(caption), "text": f"a {caption}"})
    if metadata == "jsonl":
        (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        (folder / "metadata.csv").write_text("file_name,text\n" + "".join(f"{r['file_name']},{r['text']}\n" for r in rows))
    return folder


def make_sidecar_folder(folder: Path, count: int = 4) -> Path:
    """Images with a same-named .txt caption beside each."""
    folder.mkdir(parents=True, exist_ok=True)
    for caption, color, shape in SHAPES[:count]:
        draw(color, shape).save(folder / file_name(caption))
        (folder / file_name(caption)).with_suffix(".txt").write_text(f"a {caption}\n")
    return folder


def make_saved_dataset(folder: Path, count: int = 4) -> Path:
    """A `datasets.Dataset` with an Image column, written with save_to_disk."""
    import datasets

    images = [draw(color, shape) for _, color, shape in SHAPES[:count]]
    captions = [f"a {caption}" for caption, _, _ in SHAPES[:count]]
    dataset = datasets.Dataset.from_dict({"image": images, "text": captions}).cast_column("image", datasets.Image())
    dataset.save_to_disk(str(folder))
    return folder


def make_class_folders(folder: Path, per_class: int = 2) -> Path:
    """One sub-folder per class ("circle", "square"), images of several colours in each."""
    for index, (caption, color, shape) in enumerate(SHAPES[: 2 * per_class]):
        class_dir = folder / caption.split()[1]
        class_dir.mkdir(parents=True, exist_ok=True)
        draw(color, shape).save(class_dir / f"{index}.png")
    return folder


def make_components(root: Path) -> dict:
    """A tiny AutoencoderKL (÷2, 4 channels) and a tiny CLIP text encoder + tokenizer, saved under `root`."""
    from latent_dit.tiny import make_tiny_text_encoder, make_tiny_tokenizer, make_tiny_vae

    vae_dir, text_dir = root / "vae", root / "text_encoder"
    if not (text_dir / "config.json").is_file():
        tokenizer = make_tiny_tokenizer(text_dir)
        make_tiny_text_encoder(len(tokenizer)).save_pretrained(text_dir)
        make_tiny_vae().save_pretrained(vae_dir)
    return {"vae": str(vae_dir), "text_encoder": str(text_dir)}


def tiny_tree(data: Path, output_dir: Path, components: dict, *, vae: bool = True) -> dict:
    """A complete tiny training config as a YAML tree (every value that differs from the defaults)."""
    return {
        "model": {"hidden_size": 32, "depth": 2, "num_heads": 4},
        "data": {"source": str(data), "resolution": 16, "caption_dropout": 0.0, "num_workers": 0},
        "components": {"vae": components["vae"] if vae else None, "text_encoder": components["text_encoder"]},
        "train": {
            "output_dir": str(output_dir), "max_steps": 8, "batch_size": 2, "learning_rate": 1e-3,
            "ema_decay": 0.9, "log_every": 1, "checkpoint_every": 1000, "keep_checkpoints": 2,
            "validate_every": 0, "validation_steps": 2, "validation_prompts": ["a red circle"], "report_to": "none",
        },
    }


def write_config(path: Path, tree: dict) -> Path:
    path.write_text(yaml.safe_dump(tree, sort_keys=False))
    return path


def tiny_config(data: Path, output_dir: Path, components: dict, overrides: list[str] = (), *, vae: bool = True):
    """Write the tiny config, with `section.key=value` overrides applied, to `<output_dir>.yaml` and load it
    back with `load_config` (as the CLI does); the file then describes the whole run, for subprocesses too."""
    tree = tiny_tree(data, output_dir, components, vae=vae)
    for item in overrides:
        key, value = item.split("=", 1)
        section, name = key.split(".")
        tree.setdefault(section, {})[name] = yaml.safe_load(value)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return load_config(write_config(output_dir.parent / f"{output_dir.name}.yaml", tree))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra) -> dict:
    """Environment for a training subprocess: offline, one thread per process (the CI machine has 2 cores)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
            "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO_ROOT), **extra}


def read_metrics(output_dir: Path) -> dict[int, float]:
    """step -> loss from `metrics.jsonl` (later lines win, as after a resume)."""
    losses = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        losses[row["step"]] = row["loss"]
    return losses


def load_script(name: str):
    """Import scripts/<name>.py as a module (scripts/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
