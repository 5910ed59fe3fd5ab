"""Image-caption data for training: reading the layouts people already have, checking every image once
up front, turning images into pixel tensors, and batching them (optionally by aspect-ratio bucket).

Layouts `scan_dataset` reads (see `ACCEPTED_LAYOUTS`):
  * the `datasets` "imagefolder" layout: images plus `metadata.jsonl` / `metadata.csv` (`file_name`, caption);
  * images with a same-named `.txt` caption beside each;
  * any `datasets` dataset: a `save_to_disk` folder, parquet/arrow files, or a Hub id;
  * class folders (one sub-folder per class) for class-conditional training.

The scan opens and fully decodes every image once, so a corrupt file is found before any model loads and
never mid-run; what it skipped or fixed is counted in a `DataSummary`. The random crop and flip are pure
functions of (seed, epoch, index), and `BucketBatchSampler` order is a pure function of (seed, epoch), so a
resumed or repeated run sees the same pixels in the same order.
"""

import csv
import io
import json
import logging
import math
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ACCEPTED_LAYOUTS = """Accepted layouts:
  1. a folder with metadata.jsonl or metadata.csv (columns file_name and the caption column) beside the images
  2. a folder of images, each with a same-named .txt caption beside it (cat.png + cat.txt)
  3. a `datasets` dataset: a save_to_disk folder, a folder of parquet/arrow files, or a Hub id
  4. with class_folders=True: one sub-folder per class holding its images (class index = sorted name order)"""
EXAMPLES_PER_PROBLEM = 3  # how many file names a warning or error quotes for each kind of problem
PROBLEMS = ("skipped_corrupt", "skipped_missing_caption", "skipped_missing_file", "kept_empty_caption",
            "converted_mode", "upscaled_small")  # the DataSummary counts that name something to look at


class DataError(ValueError):
    """The data cannot be used as given; the message names the source and what was wrong."""


@dataclass
class Record:
    """One usable example after the scan."""

    image: str | None  # file path (folder layouts), or None for `datasets` rows
    caption: str  # "" for class folders
    class_label: int  # -1 when not class-conditional
    row: int | None  # index into the `datasets` dataset, else None
    size: tuple[int, int]  # (height, width) of the original image, after EXIF rotation


@dataclass
class DataSummary:
    """What the scan found, for the run log."""

    source: str
    layout: str
    total: int = 0  # candidate images (files found, or dataset rows)
    used: int = 0
    skipped_corrupt: int = 0  # unreadable, truncated, or in a mode that cannot become RGB
    skipped_missing_caption: int = 0  # no caption, or an empty one, with empty_caption="skip"
    skipped_missing_file: int = 0  # listed in metadata but not on disk
    kept_empty_caption: int = 0  # no caption or an empty one, kept as "" with empty_caption="keep"
    converted_mode: int = 0  # not RGB on disk (RGBA, L, P, CMYK, 16-bit, ...), converted
    upscaled_small: int = 0  # shorter side below the training resolution, so upscaled
    examples: dict[str, list[str]] = field(default_factory=dict, repr=False)  # problem -> a few "file: reason"

    def __str__(self):
        lines = [f"{self.source} ({self.layout}): {self.used} of {self.total} images used"]
        for problem in PROBLEMS:
            if getattr(self, problem):
                lines.append(f"  {problem}: {getattr(self, problem)}  (e.g. {'; '.join(self.examples[problem])})")
        return "\n".join(lines)


# ---------------------------------------------------------------- reading images


def open_image(value) -> Image.Image:
    """Decode an image fully from a path, a `datasets` image value ({"bytes", "path"}) or a PIL image."""
    if isinstance(value, Image.Image):
        image = value
    else:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
        if isinstance(value, (str, Path)):
            value = Path(value).read_bytes()
        # Reading the bytes first means no file handle outlives this call, whatever the format.
        image = Image.open(io.BytesIO(value))
    image.load()  # the lazy header-only open would let a truncated file through
    ImageOps.exif_transpose(image, in_place=True)  # phone photos store their rotation in EXIF
    return image


def to_rgb(image: Image.Image) -> tuple[Image.Image, bool]:
    """Convert any mode to 8-bit RGB; returns (image, whether it was converted).

    Transparency is composited on white (as the shared emoji sets were), not dropped to black.
    16-bit grey is scaled by 1/257 (65535 -> 255): PIL's own convert() clips it, which turns most of
    the image white.
    """
    if image.mode == "RGB" and "transparency" not in image.info:
        return image, False
    if image.mode.startswith("I") or image.mode == "F":
        values = np.asarray(image).astype(np.float64)
        if image.mode == "F" and values.max() <= 1.0:
            values = values * 255.0
        elif image.mode.startswith("I;16") or values.max() > 255:
            values = values / 257.0
        grey = np.clip(np.round(values), 0, 255).astype(np.uint8)
        return Image.fromarray(np.stack([grey] * 3, axis=-1)), True
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB"), True
    return image.convert("RGB"), True  # L, 1, P, CMYK, YCbCr, ...


# ---------------------------------------------------------------- finding candidates per layout
# Each lister yields (image, caption or None, class_label, row); image is a path or a `datasets` value.


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def _read_metadata(metadata: Path, caption_column: str) -> list[dict]:
    if metadata.suffix == ".csv":
        with metadata.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    else:
        rows = []
        for number, line in enumerate(metadata.read_text(encoding="utf-8").splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataError(f"{metadata} line {number} is not valid JSON: {error}") from error
    columns = set().union(*(row.keys() for row in rows)) if rows else set()
    if rows and not {"file_name", caption_column} <= columns:
        raise DataError(f"{metadata} needs columns 'file_name' and {caption_column!r} (the caption_column); "
                        f"it has {sorted(columns)}")
    return rows


def _list_imagefolder(metadata: Path, caption_column: str):
    listed = set()
    for row in _read_metadata(metadata, caption_column):
        path = (metadata.parent / row["file_name"]).resolve()
        listed.add(path)
        yield str(path), row.get(caption_column), -1, None
    # Images the metadata does not mention have no caption; they are counted rather than silently ignored.
    for path in _image_files(metadata.parent):
        if path.resolve() not in listed:
            yield str(path), None, -1, None


def _list_sidecar_captions(images: list[Path]):
    for path in images:
        caption_file = path.with_suffix(".txt")
        caption = caption_file.read_text(encoding="utf-8") if caption_file.is_file() else None
        yield str(path), caption, -1, None


def _class_names(folder: Path) -> list[str]:
    # Only sub-folders holding images count, so a stray empty or hidden folder does not shift class indices.
    return sorted(d.name for d in folder.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and _image_files(d))


def _list_class_folders(folder: Path, class_names: list[str]):
    for label, name in enumerate(class_names):
        for path in _image_files(folder / name):
            yield str(path), "", label, None


def _list_dataset_rows(dataset, image_column: str, caption_column: str):
    for row, example in enumerate(dataset.select_columns([image_column, caption_column])):
        caption = example[caption_column]
        if isinstance(caption, (list, tuple)):  # several captions per image (COCO style): the first is used
            caption = caption[0] if caption else None
        yield example[image_column], None if caption is None else str(caption), -1, row


def load_hf_dataset(source, split: str = "train", image_column: str = "image"):
    """Load a `datasets` dataset (save_to_disk folder, parquet/arrow file or folder, Hub id, or an already
    loaded `datasets.Dataset`) with the image column left undecoded, so that `open_image` decodes it and a
    corrupt row can be skipped instead of raising inside `datasets`."""
    import datasets  # imported here: only this layout needs it

    path = Path(str(source))
    try:
        if isinstance(source, datasets.Dataset):
            dataset = source
        elif (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            dataset = datasets.load_from_disk(str(path))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise DataError(f"{source} holds splits {sorted(dataset)}, not split={split!r}")
                dataset = dataset[split]
        elif path.is_file():  # one parquet/arrow/json/csv file
            builder = {".jsonl": "json"}.get(path.suffix, path.suffix.lstrip("."))
            dataset = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
        else:
            dataset = datasets.load_dataset(str(source), split=split)
    except DataError:
        raise
    except Exception as error:
        raise DataError(f"Could not load {source!r} (split={split!r}) with `datasets`: "
                        f"{type(error).__name__}: {error}") from error
    if image_column not in dataset.column_names:
        raise DataError(f"{source} has no image column {image_column!r}; its columns are {dataset.column_names}")
    if isinstance(dataset.features[image_column], datasets.Image):
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    return dataset


def _dataset_candidates(source, image_column: str, caption_column: str, split: str):
    dataset = load_hf_dataset(source, split, image_column)
    if caption_column not in dataset.column_names:
        raise DataError(f"{source} has no caption column {caption_column!r}; its columns are {dataset.column_names}")
    return "datasets", _list_dataset_rows(dataset, image_column, caption_column), len(dataset), None


def _find_candidates(source, image_column, caption_column, split, class_folders, empty_caption):
    """Detect the layout of `source`; returns (layout name, candidates, how many, class names or None)."""
    path = Path(source).expanduser()
    if path.name in ("metadata.jsonl", "metadata.csv"):
        path = path.parent
    if not path.exists():
        # "name" or "owner/name" may be a Hub id; anything else that is not on disk is a wrong path.
        if not re.fullmatch(r"\w[\w.-]*(/[\w.-]+)?", str(source)):
            raise DataError(f"Data folder not found: {path.resolve()}")
        try:
            return _dataset_candidates(source, image_column, caption_column, split)
        except DataError as error:
            raise DataError(f"No folder at {path.resolve()}, and as a Hub id: {error}") from error
    if class_folders:
        class_names = _class_names(path) if path.is_dir() else []
        if not class_names:
            raise DataError(f"class_folders=True but {path} has no sub-folder holding images.\n{ACCEPTED_LAYOUTS}")
        total = sum(len(_image_files(path / name)) for name in class_names)
        return "class folders", _list_class_folders(path, class_names), total, class_names
    for metadata in (path / "metadata.jsonl", path / "metadata.csv",
                     path / split / "metadata.jsonl", path / split / "metadata.csv"):
        if metadata.is_file():
            candidates = list(_list_imagefolder(metadata, caption_column))
            return f"imagefolder, {metadata.name}", iter(candidates), len(candidates), None
    if (path.is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()
            or any(p.suffix in (".parquet", ".arrow") for p in path.rglob("*"))):
        return _dataset_candidates(source, image_column, caption_column, split)
    images = _image_files(path)
    if images and (empty_caption == "keep" or any(p.with_suffix(".txt").is_file() for p in images)):
        return ".txt captions", _list_sidecar_captions(images), len(images), None
    hint = (f"It holds {len(images)} images but no captions: pass empty_caption='keep' to train unconditionally, "
            "or class_folders=True if its sub-folders are classes.\n") if images else ""
    raise DataError(f"No known data layout in {path.resolve()}.\n{hint}{ACCEPTED_LAYOUTS}")


# ---------------------------------------------------------------- the upfront scan


def scan_dataset(source: str, *, image_column: str = "image", caption_column: str = "text", split: str = "train",
                 class_folders: bool = False, empty_caption: str = "skip", resolution: int | None = None,
                 show_progress: bool = True) -> tuple[list[Record], DataSummary, list[str] | None]:
    """Find the layout of `source`, open and decode every image once, and return
    (usable records, summary, class names or None).

    `empty_caption="skip"` drops images without a caption (or with an empty one); "keep" keeps them with
    caption "" for unconditional training. Passing `resolution` counts the images that will be upscaled.
    Raises `DataError` when nothing is usable, naming the source and why.
    """
    if empty_caption not in ("skip", "keep"):
        raise ValueError(f"empty_caption must be 'skip' or 'keep', not {empty_caption!r}")
    layout, candidates, total, class_names = _find_candidates(
        source, image_column, caption_column, split, class_folders, empty_caption)
    summary = DataSummary(source=str(source), layout=layout, total=total)
    records = []

    def note(problem: str, name: str, reason: str):
        setattr(summary, problem, getattr(summary, problem) + 1)
        examples = summary.examples.setdefault(problem, [])
        if len(examples) < EXAMPLES_PER_PROBLEM:
            examples.append(f"{name}: {reason}")

    for image, caption, class_label, row in tqdm(candidates, total=total, desc=f"Scanning {source}",
                                                  unit="img", disable=not show_progress):
        name = Path(image).name if row is None else f"row {row}"
        caption = (caption or "").strip()
        no_caption = not caption and class_label < 0  # class folders have no captions by design
        if no_caption and empty_caption == "skip":
            note("skipped_missing_caption", name, "no caption")
            continue
        if row is None and not Path(image).is_file():
            note("skipped_missing_file", name, "listed in metadata but not found")
            continue
        try:
            decoded = open_image(image)
            mode = decoded.mode
            decoded, converted = to_rgb(decoded)
        except Exception as error:  # PIL raises many types for bad files; any of them means "skip this one"
            reason = re.sub(r" <_io\.BytesIO object at \w+>", "", str(error))  # PIL names our buffer, not the file
            note("skipped_corrupt", name, f"{type(error).__name__}: {reason}")
            continue
        if no_caption:
            note("kept_empty_caption", name, "no caption, kept as ''")
        if converted:
            note("converted_mode", name, f"{mode} -> RGB")
        if resolution and min(decoded.height, decoded.width) < resolution:
            note("upscaled_small", name, f"{decoded.width}x{decoded.height} < {resolution}")
        records.append(Record(image=image if row is None else None, caption=caption, class_label=class_label,
                              row=row, size=(decoded.height, decoded.width)))
    summary.used = len(records)

    # One message per kind of problem, not per file: a web scrape can have thousands of bad files.
    # Converting a mode loses nothing, so it is logged as info, not as a warning.
    for problem in PROBLEMS:
        if getattr(summary, problem):
            logger.log(logging.INFO if problem == "converted_mode" else logging.WARNING,
                       "%s: %s %d of %d images (e.g. %s)", source, problem.replace("_", " "),
                       getattr(summary, problem), total, "; ".join(summary.examples[problem]))
    if not records:
        raise DataError(f"No usable image in {source} ({layout}): found {total} candidate images, "
                        f"none usable.\n{summary}"
                        + ("\nPass empty_caption='keep' to use images without captions."
                           if summary.skipped_missing_caption else ""))
    return records, summary, class_names


# ---------------------------------------------------------------- transforms and buckets


def make_buckets(resolution: int, multiple_of: int, *, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) sizes of about resolution² pixels, sides divisible by `multiple_of`, aspect ratio at
    most `max_aspect`, sorted from tallest to widest. Example: multiple_of 16 = VAE factor 8 × patch 2."""
    buckets = set()
    # Step the short side down from square; each step gives one landscape and one portrait bucket.
    short = max(multiple_of, round(resolution / multiple_of) * multiple_of)
    while short >= multiple_of:
        long = max(short, round(resolution * resolution / short / multiple_of) * multiple_of)
        if long / short > max_aspect:
            break
        buckets.update({(short, long), (long, short)})
        short -= multiple_of
    return sorted(buckets, key=lambda hw: hw[1] / hw[0])


def nearest_bucket(size: tuple[int, int], buckets: list[tuple[int, int]]) -> int:
    """Index of the bucket whose aspect ratio is closest to that of `size` (height, width), in log space
    so that 2:1 and 1:2 are equally far from square."""
    aspect = math.log(size[0] / size[1])
    return min(range(len(buckets)), key=lambda b: abs(math.log(buckets[b][0] / buckets[b][1]) - aspect))


def resize_and_crop(image: Image.Image, height: int, width: int, *, center_crop: bool = True,
                    rng: np.random.Generator | None = None) -> Image.Image:
    """Resize so the image covers (height, width), keeping its aspect ratio, then crop to exactly that size.
    For a square target this is "shorter side to resolution". The crop is centred unless `center_crop`
    is False, in which case `rng` picks the offset."""
    scale = max(height / image.height, width / image.width)
    new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    if new_size != image.size:
        # PIL's BICUBIC widens its kernel by the scale factor when shrinking, i.e. it antialiases.
        image = image.resize(new_size, Image.Resampling.BICUBIC)
    spare_x, spare_y = image.width - width, image.height - height
    if center_crop:
        left, top = round(spare_x / 2), round(spare_y / 2)
    else:
        left, top = int(rng.integers(0, spare_x + 1)), int(rng.integers(0, spare_y + 1))
    return image.crop((left, top, left + width, top + height))


def is_flipped(seed: int, epoch: int, index: int) -> bool:
    """The random-flip coin for one example: its own generator, independent of the crop's draws, so a
    latent cache that stores both orientations can pick the one uncached training would see."""
    return bool(np.random.default_rng([seed, epoch, index, 1]).random() < 0.5)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 (3, H, W) in [-1, 1], the VAE's input range."""
    pixels = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(pixels.transpose(2, 0, 1).copy())


class ImageCaptionDataset(torch.utils.data.Dataset):
    """Pixels, caption and class label for each scanned `Record`.

    Random crop and flip draw from a generator seeded with (seed, epoch, index), so they are reproducible
    across runs, workers and resumes. Call `set_epoch` each epoch before iterating (with the default
    persistent_workers=False, workers get a fresh copy of the dataset, epoch included, per epoch).
    A latent cache stores a fixed encoding per image, so it cannot hold per-epoch random crops: cache with
    center_crop=True, and for random_flip cache both orientations and choose with `is_flipped`.
    """

    def __init__(self, records: list[Record], *, resolution: int, center_crop: bool = True,
                 random_flip: bool = False, buckets: list[tuple[int, int]] | None = None, source=None,
                 image_column: str = "image", split: str = "train", seed: int = 0):
        self.records = records
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.buckets = buckets or [(resolution, resolution)]
        self.bucket_ids = [nearest_bucket(r.size, self.buckets) if buckets else 0 for r in records]
        if any(r.row is not None for r in records) and source is None:
            raise ValueError("records come from a `datasets` dataset: pass source= (the path/id or the Dataset)")
        self.source, self.image_column, self.split = source, image_column, split
        self._hf_dataset = None  # opened on first use, so each DataLoader worker opens its own
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def bucket_of(self, i: int) -> int:
        return self.bucket_ids[i]

    def __len__(self):
        return len(self.records)

    def _image_value(self, record: Record):
        if record.row is None:
            return record.image
        if self._hf_dataset is None:
            self._hf_dataset = load_hf_dataset(self.source, self.split, self.image_column)
        return self._hf_dataset[record.row][self.image_column]

    def __getitem__(self, i: int) -> dict:
        record = self.records[i]
        image, _ = to_rgb(open_image(self._image_value(record)))
        rng = np.random.default_rng([self.seed, self.epoch, i, 0])
        height, width = self.buckets[self.bucket_ids[i]]
        image = resize_and_crop(image, height, width, center_crop=self.center_crop, rng=rng)
        if self.random_flip and is_flipped(self.seed, self.epoch, i):
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return {"pixel_values": to_tensor(image), "caption": record.caption,
                "class_label": record.class_label, "index": i}


def collate(examples: list[dict]) -> dict:
    """Stack a batch under the example keys: pixel_values (B, 3, H, W), caption (list of str),
    class_label and index (LongTensor). Sizes must match, as `BucketBatchSampler` guarantees."""
    sizes = {tuple(e["pixel_values"].shape) for e in examples}
    if len(sizes) > 1:
        raise ValueError(f"batch mixes image sizes {sorted(sizes)}: use BucketBatchSampler with bucketed data")
    return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "caption": [e["caption"] for e in examples],
            "class_label": torch.tensor([e["class_label"] for e in examples], dtype=torch.long),
            "index": torch.tensor([e["index"] for e in examples], dtype=torch.long)}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Batches of dataset indices, each batch from one bucket; the order is a pure function of
    (seed, epoch), so resuming is `set_epoch(epoch)` plus `accelerator.skip_first_batches`.

    It does not shard: `accelerator.prepare(DataLoader(dataset, batch_sampler=sampler))` hands whole
    batches round-robin to the processes. Keep drop_last=True with several processes: accelerate then
    drops the last round of fewer batches than processes, whereas with drop_last=False it fills that
    round with indices from the first batches, which can mix buckets.
    """

    def __init__(self, bucket_ids: list[int], batch_size: int, *, seed: int, shuffle: bool = True,
                 drop_last: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        self.bucket_ids = list(bucket_ids)
        self.batch_size = batch_size  # accelerate reads batch_size and drop_last from the sampler
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        if len(self) == 0:
            sizes = {bucket: len(indices) for bucket, indices in sorted(self._members().items())}
            raise ValueError(f"no batch of {batch_size} can be made from {len(self.bucket_ids)} images "
                             f"(images per bucket: {sizes}); lower batch_size or pass drop_last=False")

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def _members(self) -> dict[int, list[int]]:
        members = defaultdict(list)
        for index, bucket in enumerate(self.bucket_ids):
            members[bucket].append(index)
        return members

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        batches = []
        for bucket, indices in sorted(self._members().items()):
            if self.shuffle:
                indices = rng.permutation(indices).tolist()
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start:start + self.batch_size]
                if len(batch) == self.batch_size or not self.drop_last:
                    batches.append(batch)
        if self.shuffle:  # interleave the buckets, else training would see one aspect ratio at a time
            batches = [batches[k] for k in rng.permutation(len(batches))]
        yield from batches

    def __len__(self):
        rounding = math.floor if self.drop_last else math.ceil
        return sum(rounding(len(indices) / self.batch_size) for indices in self._members().values())
