"""Build the emoji image-caption folder from npm packages, and split it into train / held-out by emoji.

    python scripts/prepare_emoji_data.py --out data/emoji_fluent3d_256
    python scripts/prepare_emoji_data.py --split-only ../shared/data/emoji_fluent3d_256 --split-out data/emoji_fluent3d_256_split

The first command packs two npm packages (about 41 MB of tarballs): the images of
`@lobehub/fluent-emoji-3d` (3D Fluent emoji, 256x256 RGBA WebP named by code points, "1f44d-1f3fb.webp")
and `emoji-datasource` (the Unicode name of every emoji and of its skin-tone variants). It writes
`--out` in the `datasets` imagefolder layout, the same as ../shared/data/emoji_fluent3d_256: one PNG per
named emoji, composited on white, plus `metadata.jsonl` lines {"file_name": "1f44d.png", "text": "a 3d
rendered thumbs up sign emoji"}. Images without a name in emoji-datasource (unpadded duplicates such as
"23-fe0f-20e3" and the three subdivision flags) are skipped and counted. The output is deterministic: the
package versions are pinned and their tarballs checked against the registry's integrity hashes.

Both commands write the split into `--split-out` (default: `<out>_split`, beside the images):
`train/metadata.jsonl` and `heldout/metadata.jsonl`, whose `file_name`s point back to the images
("../../emoji_fluent3d_256/1f44d.png"), so nothing is copied. `latent-dit train` reads
`data.source: <split-out>/train` (or `<split-out>` with the default `data.split: train`), and
`latent-dit eval --data <split-out>` reads `heldout/`. The split lives outside the image folder because
`datasets.load_dataset("imagefolder")` rejects metadata whose paths leave its folder.

The held-out share is picked by emoji, not by image: every skin-tone variant of an emoji ("thumbs up
sign" and its five tones) goes to the same side, so the held-out captions name emoji the model never saw.
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from collections import defaultdict
from pathlib import Path

from PIL import Image
from tqdm.auto import tqdm

IMAGES_PACKAGE = "@lobehub/fluent-emoji-3d@1.1.0"
NAMES_PACKAGE = "emoji-datasource@16.0.0"
# The registry's sha512 of the pinned tarballs (`npm view PACKAGE dist.integrity`): same input, same folder.
INTEGRITY = {
    IMAGES_PACKAGE: "sha512-Wlq2lVStTnr8BDpIJ0pEnTKO4LuDxxqTEhTvRtD1DLRF0me7ogeRQjKoehDHXuVJ2Qaecgl5wRBv60lUAG3h7g==",
    NAMES_PACKAGE: "sha512-/qHKqK5Nr3+8zhgO6kHmF43Fm5C8HNn0AaFRIpgw8HF3+uF0Vfc8jgLI1ZQS5ba1vBzksS8NBCjHejwLb2D/Sg==",
}
CAPTION = "a 3d rendered {name} emoji"
# The Fitzpatrick modifiers, named as Unicode's CLDR names them in "thumbs up sign, light skin tone".
SKIN_TONES = {"1f3fb": "light skin tone", "1f3fc": "medium-light skin tone", "1f3fd": "medium skin tone",
              "1f3fe": "medium-dark skin tone", "1f3ff": "dark skin tone"}
IMAGE_SUFFIXES = (".webp", ".png")
SPLITS = ("train", "heldout")


# ---------------------------------------------------------------- fetching the packages


def npm_pack(spec: str, workdir: Path, npm_cache: str | None = None) -> Path:
    """`npm pack` one package into `workdir` (reused when already there) and unpack it; returns its folder."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = ["npm", "pack", spec, "--json", "--pack-destination", str(workdir)]
    if npm_cache:
        command += ["--cache", npm_cache]
    try:
        result = subprocess.run(command, check=True, capture_output=True, text=True)
    except FileNotFoundError:
        sys.exit("error: `npm` is not installed; install Node.js (e.g. `apt-get install npm`) and run again.")
    except subprocess.CalledProcessError as error:
        sys.exit(f"error: `{' '.join(command)}` failed:\n{error.stderr.strip()}")
    (packed,) = json.loads(result.stdout)
    if spec in INTEGRITY and packed["integrity"] != INTEGRITY[spec]:
        sys.exit(f"error: {spec} from the registry has integrity {packed['integrity']}, not the pinned {INTEGRITY[spec]}")
    tarball = workdir / packed["filename"]
    folder = workdir / tarball.name.removesuffix(".tgz")
    if not folder.is_dir():
        with tarfile.open(tarball) as archive:
            # The "data" filter refuses absolute paths, links out of the folder and device files.
            archive.extractall(folder, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    return folder / "package"


# ---------------------------------------------------------------- names and groups


def emoji_names(emoji_json: Path) -> dict[str, str]:
    """Lower-case code-point sequence ("1f44d-1f3fb") -> lower-case name ("thumbs up sign, light skin tone"),
    for every emoji in emoji-datasource's emoji.json and every skin-tone variant of it."""
    names = {}
    for emoji in json.loads(emoji_json.read_text(encoding="utf-8")):
        name = emoji["name"].lower()
        variants = [(emoji, name)]
        for tones, variant in (emoji.get("skin_variations") or {}).items():
            # Two-person emoji have two tones, "1F3FB-1F3FC": "..., light skin tone, medium-light skin tone".
            tone_names = ", ".join(SKIN_TONES[tone.lower()] for tone in tones.split("-"))
            variants.append((variant, f"{name}, {tone_names}"))
        for entry, entry_name in variants:
            for sequence in (entry["unified"], entry.get("non_qualified")):
                if sequence:
                    names.setdefault(sequence.lower(), entry_name)  # the fully-qualified form wins
    return names


def emoji_group(file_name: str) -> str:
    """The emoji an image belongs to: its code points without skin-tone modifiers ("1f44d-1f3fb.png" -> "1f44d")."""
    return "-".join(part for part in Path(file_name).stem.lower().split("-") if part not in SKIN_TONES)


def split_by_emoji(file_names: list[str], heldout_fraction: float = 0.1, seed: int = 0) -> dict[str, list[str]]:
    """{"train": [...], "heldout": [...]}: whole emoji groups are held out until they hold
    `heldout_fraction` of the images.

    The groups are taken in the order of sha256(f"{seed}:{group}"), which depends on nothing but the seed
    and the group's own name: no library's random stream, and the same emoji stay held out when a newer
    package adds others.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction must be between 0 and 1 (exclusive), not {heldout_fraction}")
    groups = defaultdict(list)
    for file_name in sorted(file_names):
        groups[emoji_group(file_name)].append(file_name)
    order = sorted(groups, key=lambda group: hashlib.sha256(f"{seed}:{group}".encode()).hexdigest())
    target = round(heldout_fraction * len(file_names))
    heldout = set()
    for group in order:
        if len(heldout) >= target:
            break
        heldout.update(groups[group])
    return {"train": sorted(set(file_names) - heldout), "heldout": sorted(heldout)}


# ---------------------------------------------------------------- writing folders


def read_metadata(folder: Path) -> list[dict]:
    path = folder / "metadata.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: pass a folder in the imagefolder layout (images + metadata.jsonl)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_metadata(folder: Path, rows: list[dict]):
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    (folder / "metadata.jsonl").write_text(text, encoding="utf-8")


def on_white(image: Image.Image, size: int) -> Image.Image:
    """RGBA -> RGB composited on white (as latent_dit.data.to_rgb does), resized to size x size if needed."""
    rgba = image.convert("RGBA")
    rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    if rgb.size != (size, size):
        # Resized after compositing, so transparent pixels' hidden colours cannot bleed into the edges.
        rgb = rgb.resize((size, size), Image.Resampling.LANCZOS)
    return rgb


def build_image_folder(assets: Path, names: dict[str, str], out: Path, size: int = 256) -> dict:
    """Write one PNG per named emoji image in `assets` and `out/metadata.jsonl`; returns counts."""
    images = sorted(p for p in assets.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"no {'/'.join(IMAGE_SUFFIXES)} images in {assets}")
    out.mkdir(parents=True, exist_ok=True)
    rows, unnamed = [], []
    for path in tqdm(images, desc=f"Writing {out}", unit="img"):
        name = names.get(path.stem.lower())
        if name is None:
            unnamed.append(path.name)
            continue
        file_name = f"{path.stem.lower()}.png"
        with Image.open(path) as image:
            on_white(image, size).save(out / file_name)
        rows.append({"file_name": file_name, "text": CAPTION.format(name=name)})
    write_metadata(out, rows)
    return {"images": len(images), "written": len(rows), "skipped_unnamed": len(unnamed), "unnamed": unnamed}


def write_split(image_folder: Path, split_out: Path, heldout_fraction: float = 0.1, seed: int = 0) -> dict:
    """Split an imagefolder (its metadata.jsonl) by emoji into `split_out/{train,heldout}/metadata.jsonl`,
    pointing at the images where they are; also writes `split_out/split.json`. Returns the counts."""
    rows = read_metadata(image_folder)
    by_name = {row["file_name"]: row for row in rows}
    splits = split_by_emoji(list(by_name), heldout_fraction, seed)
    for split in SPLITS:
        folder = split_out / split
        folder.mkdir(parents=True, exist_ok=True)
        # Relative paths, so the image folder and the split can move together (e.g. to another machine).
        prefix = Path(os.path.relpath(image_folder.resolve(), folder.resolve())).as_posix()
        write_metadata(folder, [{**by_name[name], "file_name": f"{prefix}/{name}"} for name in splits[split]])
    summary = {
        "source": str(image_folder), "heldout_fraction": heldout_fraction, "seed": seed,
        "grouping": "code points without skin-tone modifiers 1f3fb-1f3ff",
        **{f"{split}_images": len(splits[split]) for split in SPLITS},
        **{f"{split}_emoji": len({emoji_group(name) for name in splits[split]}) for split in SPLITS},
    }
    (split_out / "split.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, help="Image folder to write (images + metadata.jsonl).")
    parser.add_argument("--size", type=int, default=256, help="Image side in pixels (the package's images are 256).")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="Where the npm tarballs are packed and unpacked, and reused on the next run "
                             "(default: a temporary folder, deleted afterwards).")
    parser.add_argument("--npm-cache", default=None, help="npm's cache folder (npm pack --cache).")
    parser.add_argument("--images-package", default=IMAGES_PACKAGE, help="npm package@version with the images.")
    parser.add_argument("--names-package", default=NAMES_PACKAGE, help="npm package@version with emoji.json.")
    parser.add_argument("--split-only", type=Path, default=None, metavar="FOLDER",
                        help="Only split an existing image folder (e.g. ../shared/data/emoji_fluent3d_256).")
    parser.add_argument("--split-out", type=Path, default=None,
                        help="Folder for train/ and heldout/ metadata (default: <image folder>_split beside it).")
    parser.add_argument("--heldout-fraction", type=float, default=0.1, help="Share of images held out, by emoji.")
    parser.add_argument("--seed", type=int, default=0, help="Picks which emoji are held out.")
    args = parser.parse_args(argv)
    if (args.out is None) == (args.split_only is None):
        parser.error("pass --out (build the folder from npm, then split it) or --split-only FOLDER, not both")

    result = {}
    image_folder = args.split_only
    if image_folder is None:
        image_folder = args.out
        with tempfile.TemporaryDirectory(prefix="emoji-npm-") as temporary:
            workdir = args.workdir or Path(temporary)
            assets = npm_pack(args.images_package, workdir, args.npm_cache) / "assets"
            names = emoji_names(npm_pack(args.names_package, workdir, args.npm_cache) / "emoji.json")
            result = build_image_folder(assets, names, args.out, args.size)
        print(f"{args.out}: {result['written']} images of {result['images']}; skipped {result['skipped_unnamed']} "
              f"without a name in {args.names_package} (e.g. {', '.join(result['unnamed'][:5])})")
    split_out = args.split_out or image_folder.with_name(f"{image_folder.name}_split")
    split = write_split(image_folder, split_out, args.heldout_fraction, args.seed)
    print(f"{split_out}: train {split['train_images']} images ({split['train_emoji']} emoji), "
          f"heldout {split['heldout_images']} images ({split['heldout_emoji']} emoji)")
    return {**result, "split": split}


if __name__ == "__main__":
    main()
