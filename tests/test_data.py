"""Tests for latent_dit.data: each layout read correctly, transforms on known pixels, buckets, sampler
determinism, and every kind of bad data counted and handled."""

import json
import logging
import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from latent_dit.data import (
    BucketBatchSampler,
    DataError,
    ImageCaptionDataset,
    collate,
    is_flipped,
    make_buckets,
    scan_dataset,
    to_rgb,
)

SHARED = Path(os.environ.get("LATENT_DIT_SHARED", Path(__file__).resolve().parents[2] / "shared"))
RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def shape_image(color, size=(48, 40), background=WHITE) -> Image.Image:
    """A coloured ellipse on a background; size is (width, height) as PIL takes it."""
    image = Image.new("RGB", size, background)
    ImageDraw.Draw(image).ellipse([4, 4, size[0] - 5, size[1] - 5], fill=color)
    return image


def pixel(tensor: torch.Tensor, y: int, x: int) -> tuple[int, ...]:
    """Back from [-1, 1] to 0..255 at one position."""
    return tuple(int(v) for v in ((tensor[:, y, x] + 1) * 127.5).round())


def write_jsonl(folder: Path, rows: list[dict]):
    (folder / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))


@pytest.fixture
def jsonl_folder(tmp_path):
    for name, color in [("red.png", RED), ("green.png", GREEN), ("blue.png", BLUE)]:
        shape_image(color).save(tmp_path / name)
    write_jsonl(tmp_path, [{"file_name": "red.png", "text": "a red circle"},
                           {"file_name": "green.png", "text": "a green circle"},
                           {"file_name": "blue.png", "text": "a blue circle"}])
    return tmp_path


# ---------------------------------------------------------------- layouts


def test_imagefolder_jsonl_keeps_metadata_order_and_captions(jsonl_folder):
    records, summary, class_names = scan_dataset(str(jsonl_folder), show_progress=False)
    assert [r.caption for r in records] == ["a red circle", "a green circle", "a blue circle"]
    assert [Path(r.image).name for r in records] == ["red.png", "green.png", "blue.png"]
    assert all(r.size == (40, 48) and r.class_label == -1 and r.row is None for r in records)
    assert (summary.total, summary.used, summary.skipped_corrupt) == (3, 3, 0)
    assert class_names is None
    assert "3 of 3 images used" in str(summary)


def test_imagefolder_csv_with_custom_caption_column(tmp_path):
    shape_image(RED).save(tmp_path / "a.png")
    shape_image(BLUE).save(tmp_path / "b.png")
    (tmp_path / "metadata.csv").write_text('file_name,prompt\na.png,"red, round"\nb.png,blue\n')
    records, summary, _ = scan_dataset(str(tmp_path), caption_column="prompt", show_progress=False)
    assert [(Path(r.image).name, r.caption) for r in records] == [("a.png", "red, round"), ("b.png", "blue")]
    with pytest.raises(DataError, match="caption_column"):
        scan_dataset(str(tmp_path), caption_column="text", show_progress=False)


def test_sidecar_txt_captions_recursive_and_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    shape_image(RED).save(tmp_path / "b.png")
    (tmp_path / "b.txt").write_text("  red thing\n")
    shape_image(GREEN).save(tmp_path / "a.jpg", quality=95)
    (tmp_path / "a.txt").write_text("green thing")
    shape_image(BLUE).save(tmp_path / "sub" / "c.png")
    (tmp_path / "sub" / "c.txt").write_text("blue thing")
    records, summary, _ = scan_dataset(str(tmp_path), show_progress=False)
    assert [r.caption for r in records] == ["green thing", "red thing", "blue thing"]  # a.jpg, b.png, sub/c.png
    assert summary.layout == ".txt captions"


def test_saved_hf_dataset_with_custom_columns_and_corrupt_row(tmp_path):
    import datasets

    def png_bytes(image):
        path = tmp_path / "tmp.png"
        image.save(path)
        return path.read_bytes()

    features = datasets.Features({"picture": datasets.Image(), "prompt": datasets.Value("string")})
    dataset = datasets.Dataset.from_dict(
        {"picture": [{"bytes": png_bytes(shape_image(RED)), "path": None},
                     {"bytes": b"not an image at all", "path": None},
                     {"bytes": png_bytes(shape_image(BLUE, background=GREEN)), "path": None}],
         "prompt": ["red", "broken", "blue on green"]}, features=features)
    dataset.save_to_disk(str(tmp_path / "saved"))

    records, summary, _ = scan_dataset(str(tmp_path / "saved"), image_column="picture", caption_column="prompt",
                                       show_progress=False)
    assert [(r.row, r.caption, r.image) for r in records] == [(0, "red", None), (2, "blue on green", None)]
    assert (summary.layout, summary.skipped_corrupt, summary.used) == ("datasets", 1, 2)

    data = ImageCaptionDataset(records, resolution=32, source=str(tmp_path / "saved"), image_column="picture")
    example = data[1]
    assert example["caption"] == "blue on green"
    assert pixel(example["pixel_values"], 16, 16) == BLUE and pixel(example["pixel_values"], 0, 0) == GREEN
    # A loaded Dataset object works as the source too.
    same = ImageCaptionDataset(records, resolution=32, source=dataset, image_column="picture")
    assert torch.equal(same[1]["pixel_values"], example["pixel_values"])
    with pytest.raises(ValueError, match="source"):
        ImageCaptionDataset(records, resolution=32)
    with pytest.raises(DataError, match="no caption column 'text'"):
        scan_dataset(str(tmp_path / "saved"), image_column="picture", show_progress=False)


def test_parquet_folder_loads_as_dataset(tmp_path):
    import datasets

    (tmp_path / "img.png").parent.mkdir(exist_ok=True)
    shape_image(RED).save(tmp_path / "img.png")
    dataset = datasets.Dataset.from_dict({"image": [str(tmp_path / "img.png")] * 2, "text": ["one", "two"]},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "text": datasets.Value("string")}))
    (tmp_path / "pq").mkdir()
    dataset.to_parquet(str(tmp_path / "pq" / "train.parquet"))
    records, summary, _ = scan_dataset(str(tmp_path / "pq"), show_progress=False)
    assert [r.caption for r in records] == ["one", "two"] and summary.layout == "datasets"


def test_class_folders_label_by_sorted_name(tmp_path):
    for name, color in [("zebra", BLUE), ("apple", RED), ("mango", GREEN)]:
        (tmp_path / name).mkdir()
        for k in range(2):
            shape_image(color).save(tmp_path / name / f"{k}.png")
    (tmp_path / "empty").mkdir()  # holds no image: must not become a class
    records, summary, class_names = scan_dataset(str(tmp_path), class_folders=True, show_progress=False)
    assert class_names == ["apple", "mango", "zebra"]
    assert [r.class_label for r in records] == [0, 0, 1, 1, 2, 2]
    assert all(r.caption == "" for r in records) and summary.skipped_missing_caption == 0
    example = ImageCaptionDataset(records, resolution=32)[4]
    assert example["class_label"] == 2 and pixel(example["pixel_values"], 16, 16) == BLUE


def test_unknown_layout_and_missing_folder_errors(tmp_path):
    (tmp_path / "notes.md").write_text("hello")
    with pytest.raises(DataError, match="Accepted layouts") as error:
        scan_dataset(str(tmp_path), show_progress=False)
    assert str(tmp_path) in str(error.value)

    shape_image(RED).save(tmp_path / "plain.png")  # an image with no caption of any kind
    with pytest.raises(DataError, match="empty_caption='keep'"):
        scan_dataset(str(tmp_path), show_progress=False)
    records, summary, _ = scan_dataset(str(tmp_path), empty_caption="keep", show_progress=False)
    assert [r.caption for r in records] == [""] and summary.kept_empty_caption == 1

    missing = tmp_path / "does" / "not" / "exist"
    with pytest.raises(DataError, match="not found") as error:
        scan_dataset(str(missing), show_progress=False)
    assert str(missing) in str(error.value)
    # A relative name that could be a Hub id: offline, so it fails, and the message still names the folder.
    with pytest.raises(DataError, match="No folder at"):
        scan_dataset("no-such-owner/no-such-dataset", show_progress=False)
    with pytest.raises(ValueError, match="empty_caption"):
        scan_dataset(str(tmp_path), empty_caption="drop")


# ---------------------------------------------------------------- transforms


def test_center_crop_on_known_image_and_range(tmp_path):
    # 64 wide x 32 high: red | green (middle half) | blue. Shorter side already 32, so no resize:
    # the centre 32x32 crop must be exactly the green middle.
    image = Image.new("RGB", (64, 32), RED)
    image.paste(GREEN, (16, 0, 48, 32))
    image.paste(BLUE, (48, 0, 64, 32))
    image.save(tmp_path / "bands.png")
    write_jsonl(tmp_path, [{"file_name": "bands.png", "text": "bands"}])
    records, _, _ = scan_dataset(str(tmp_path), show_progress=False)
    pixels = ImageCaptionDataset(records, resolution=32)[0]["pixel_values"]
    assert pixels.shape == (3, 32, 32) and pixels.dtype == torch.float32
    expected = torch.tensor([-1.0, 1.0, -1.0]).view(3, 1, 1).expand(3, 32, 32)
    assert torch.equal(pixels, expected)

    # Downscaled to 16: still green in the middle, values stay inside [-1, 1] despite bicubic overshoot.
    small = ImageCaptionDataset(records, resolution=16)[0]["pixel_values"]
    assert small.shape == (3, 16, 16) and small.min() >= -1 and small.max() <= 1
    assert pixel(small, 8, 8) == GREEN
    # A random crop can reach the red band somewhere over a few epochs; a centre crop never does.
    random_crop = ImageCaptionDataset(records, resolution=32, center_crop=False, seed=3)
    corners = set()
    for epoch in range(8):
        random_crop.set_epoch(epoch)
        corners.add(pixel(random_crop[0]["pixel_values"], 0, 0))
    assert RED in corners


def test_random_flip_reproducible_and_exact_mirror(tmp_path):
    image = shape_image(RED)
    image.paste(BLUE, (0, 0, 10, 40))  # a blue left edge, so that a flip changes the pixels
    image.save(tmp_path / "marked.png")
    write_jsonl(tmp_path, [{"file_name": "marked.png", "text": "marked"}])
    records, _, _ = scan_dataset(str(tmp_path), show_progress=False)
    records = records * 24  # enough examples that both outcomes of the coin occur
    plain = ImageCaptionDataset(records, resolution=32)
    run_a = ImageCaptionDataset(records, resolution=32, random_flip=True, seed=7)
    run_b = ImageCaptionDataset(records, resolution=32, random_flip=True, seed=7)
    flips = []
    for i in range(len(records)):
        a, b, p = run_a[i]["pixel_values"], run_b[i]["pixel_values"], plain[i]["pixel_values"]
        assert torch.equal(a, b)
        assert torch.equal(a, p) or torch.equal(a, p.flip(-1))
        flips.append(not torch.equal(a, p))
    assert 0 < sum(flips) < len(flips)
    assert flips == [is_flipped(7, 0, i) for i in range(len(records))]  # what a latent cache would consult
    run_a.set_epoch(1)
    flips_epoch_1 = [not torch.equal(run_a[i]["pixel_values"], plain[i]["pixel_values"]) for i in range(len(records))]
    assert flips_epoch_1 != flips and flips_epoch_1 == [is_flipped(7, 1, i) for i in range(len(records))]


# ---------------------------------------------------------------- buckets and sampler


def test_make_buckets_divisible_and_near_pixel_count():
    buckets = make_buckets(256, 16, max_aspect=2.0)
    assert (256, 256) in buckets and len(buckets) >= 5
    for height, width in buckets:
        assert height % 16 == 0 and width % 16 == 0
        assert abs(height * width - 256 * 256) / (256 * 256) < 0.1
        assert max(height, width) / min(height, width) <= 2.0
    assert all((w, h) in buckets for h, w in buckets)  # portrait and landscape alike
    assert make_buckets(32, 16) == [(32, 32)]


def test_bucketed_dataset_batches_come_from_one_bucket(tmp_path):
    rows = []
    for k, size in enumerate([(64, 64), (128, 64), (64, 128), (96, 96), (130, 60), (60, 130)] * 3):
        shape_image(RED, size=size).save(tmp_path / f"{k}.png")
        rows.append({"file_name": f"{k}.png", "text": f"image {k}"})
    write_jsonl(tmp_path, rows)
    records, _, _ = scan_dataset(str(tmp_path), show_progress=False)
    buckets = make_buckets(64, 16)
    data = ImageCaptionDataset(records, resolution=64, buckets=buckets)
    wide = data.bucket_of(1)  # 128 wide, 64 high
    assert buckets[wide][1] > buckets[wide][0] and buckets[data.bucket_of(0)] == (64, 64)

    sampler = BucketBatchSampler(data.bucket_ids, batch_size=2, seed=0)
    loader = torch.utils.data.DataLoader(data, batch_sampler=sampler, collate_fn=collate)
    seen = 0
    for batch in loader:
        assert len({data.bucket_of(i) for i in batch["index"].tolist()}) == 1
        assert batch["pixel_values"].shape[-2:] == buckets[data.bucket_of(int(batch["index"][0]))]
        assert batch["class_label"].dtype == torch.long and len(batch["caption"]) == 2
        seen += 1
    assert seen == len(sampler) > 0
    with pytest.raises(ValueError, match="mixes image sizes"):
        collate([data[0], data[1]])


def test_sampler_order_depends_only_on_seed_and_epoch():
    bucket_ids = [0, 1, 2] * 10 + [0]  # bucket sizes 11, 10, 10

    def epoch_batches(seed, epoch, **kwargs):
        sampler = BucketBatchSampler(bucket_ids, 4, seed=seed, **kwargs)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert epoch_batches(0, 3) == epoch_batches(0, 3)
    assert epoch_batches(0, 3) != epoch_batches(0, 4)
    assert epoch_batches(0, 3) != epoch_batches(1, 3)
    full = epoch_batches(0, 0)
    assert len(full) == 6 == len(BucketBatchSampler(bucket_ids, 4, seed=0))  # 2 full batches per bucket
    assert all(len(b) == 4 and len({bucket_ids[i] for i in b}) == 1 for b in full)
    kept = epoch_batches(0, 0, drop_last=False)
    assert len(kept) == 9 == len(BucketBatchSampler(bucket_ids, 4, seed=0, drop_last=False))
    assert sorted(i for b in kept for i in b) == list(range(len(bucket_ids)))
    ordered = epoch_batches(0, 5, shuffle=False, drop_last=False)
    assert ordered[0] == [0, 3, 6, 9] and ordered == epoch_batches(1, 0, shuffle=False, drop_last=False)
    with pytest.raises(ValueError, match="lower batch_size"):
        BucketBatchSampler([0, 1, 2], 2, seed=0)


def test_sampler_under_accelerate_sharding_hands_out_whole_batches():
    from accelerate.data_loader import BatchSamplerShard

    sampler = BucketBatchSampler([0, 1] * 13, 3, seed=0)  # 4 full batches per bucket, 8 in all
    shards = [list(BatchSamplerShard(sampler, num_processes=3, process_index=rank)) for rank in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]  # the last round of 2 batches for 3 ranks is dropped
    batches = list(sampler)
    assert [shards[k % 3][k // 3] for k in range(6)] == batches[:6]


# ---------------------------------------------------------------- bad data


@pytest.fixture
def messy_folder(tmp_path):
    """One example of every kind of bad data, listed in one metadata.jsonl."""
    rows = []

    def add(name, caption="a caption"):
        rows.append({"file_name": name, "text": caption})

    shape_image(RED).save(tmp_path / "good.png"); add("good.png")
    shape_image(GREEN).save(tmp_path / "full.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "full.png").read_bytes()[:200]); add("truncated.png")
    (tmp_path / "full.png").unlink()
    (tmp_path / "noise.png").write_bytes(np.random.default_rng(0).bytes(500)); add("noise.png")
    rgba = Image.new("RGBA", (32, 32), (255, 0, 0, 255))
    rgba.paste((0, 0, 255, 0), (16, 0, 32, 32))  # right half fully transparent blue
    rgba.save(tmp_path / "rgba.png"); add("rgba.png")
    Image.new("LA", (32, 32), (0, 0)).save(tmp_path / "la.png"); add("la.png")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([0, 0, 255, 0, 255, 0])
    palette.paste(1, (16, 0, 32, 32))
    palette.info["transparency"] = 1  # right half transparent
    palette.save(tmp_path / "p_transparent.png"); add("p_transparent.png")
    shape_image(GREEN).convert("P").save(tmp_path / "p.png"); add("p.png")
    Image.new("L", (32, 32), 100).save(tmp_path / "grey.png"); add("grey.png")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=95); add("cmyk.jpg")
    Image.fromarray(np.full((32, 32), 128 * 257, dtype=np.uint16)).save(tmp_path / "i16.png"); add("i16.png")
    shape_image(BLUE, size=(10, 10)).save(tmp_path / "tiny.png"); add("tiny.png")
    shape_image(BLUE).save(tmp_path / "empty_caption.png"); add("empty_caption.png", "   ")
    shape_image(BLUE).save(tmp_path / "null_caption.png"); add("null_caption.png", None)
    shape_image(BLUE).save(tmp_path / "unlisted.png")  # in the folder, not in the metadata
    add("gone.png")  # in the metadata, not in the folder
    write_jsonl(tmp_path, rows)
    return tmp_path


def test_bad_data_is_counted_converted_or_skipped(messy_folder, caplog):
    with caplog.at_level(logging.WARNING, logger="latent_dit.data"):
        records, summary, _ = scan_dataset(str(messy_folder), resolution=32, show_progress=False)
    used = {Path(r.image).name: r for r in records}
    assert sorted(used) == sorted(["good.png", "rgba.png", "la.png", "p_transparent.png", "p.png", "grey.png",
                                   "cmyk.jpg", "i16.png", "tiny.png"])
    assert summary.total == 15 and summary.used == 9
    assert summary.skipped_corrupt == 2  # truncated.png, noise.png
    assert summary.skipped_missing_caption == 3  # empty, null, unlisted
    assert summary.skipped_missing_file == 1
    assert summary.converted_mode == 7  # rgba, la, p_transparent, p, grey, cmyk, i16
    assert summary.upscaled_small == 1 and used["tiny.png"].size == (10, 10)
    assert "skipped_corrupt: 2" in str(summary) and "truncated.png" in str(summary)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 4  # one per kind: corrupt, missing caption, missing file, upscaled
    assert any("skipped corrupt 2 of 15" in w for w in warnings)

    data = ImageCaptionDataset(records, resolution=32)
    by_name = {Path(r.image).name: data[i]["pixel_values"] for i, r in enumerate(records)}
    assert pixel(by_name["rgba.png"], 5, 5) == RED and pixel(by_name["rgba.png"], 5, 25) == WHITE
    assert pixel(by_name["la.png"], 5, 5) == WHITE  # fully transparent black -> white, not black
    assert pixel(by_name["p_transparent.png"], 5, 5) == BLUE and pixel(by_name["p_transparent.png"], 5, 25) == WHITE
    assert pixel(by_name["p.png"], 20, 24) == GREEN
    assert pixel(by_name["grey.png"], 5, 5) == (100, 100, 100)
    assert all(abs(a - b) <= 3 for a, b in zip(pixel(by_name["cmyk.jpg"], 5, 5), RED))
    assert pixel(by_name["i16.png"], 5, 5) == (128, 128, 128)  # 16-bit scaled by 1/257, not clipped to 255
    assert by_name["tiny.png"].shape == (3, 32, 32) and pixel(by_name["tiny.png"], 16, 16) == BLUE


def test_empty_caption_keep_policy(messy_folder):
    records, summary, _ = scan_dataset(str(messy_folder), empty_caption="keep", show_progress=False)
    captions = {Path(r.image).name: r.caption for r in records}
    assert captions["empty_caption.png"] == captions["null_caption.png"] == captions["unlisted.png"] == ""
    assert summary.kept_empty_caption == 3 and summary.skipped_missing_caption == 0 and summary.used == 12


def test_16_bit_extremes_map_to_8_bit_extremes():
    image = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    rgb, converted = to_rgb(image)
    assert converted and np.asarray(rgb)[0, :, 0].tolist() == [0, 1, 255]


def test_folder_with_no_usable_image_raises_naming_it(tmp_path):
    for k in range(3):
        (tmp_path / f"{k}.png").write_bytes(b"garbage" * k)
    write_jsonl(tmp_path, [{"file_name": f"{k}.png", "text": "x"} for k in range(3)])
    with pytest.raises(DataError, match="No usable image") as error:
        scan_dataset(str(tmp_path), show_progress=False)
    assert str(tmp_path) in str(error.value) and "skipped_corrupt: 3" in str(error.value)


# ---------------------------------------------------------------- the real shared data


def test_real_emoji_folder():
    folder = SHARED / "data" / "emoji_google64"
    if not (folder / "metadata.jsonl").is_file():
        pytest.skip(f"shared emoji data not found at {folder} (set LATENT_DIT_SHARED)")
    records, summary, _ = scan_dataset(str(folder), resolution=64, show_progress=False)
    assert len(records) == summary.used == summary.total == 3786
    assert summary.skipped_corrupt == summary.upscaled_small == 0
    assert records[0].caption == "hash key emoji (symbols)" and records[0].size == (64, 64)
    example = ImageCaptionDataset(records, resolution=64)[0]
    assert example["pixel_values"].shape == (3, 64, 64) and pixel(example["pixel_values"], 0, 0) == WHITE
