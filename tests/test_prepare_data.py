"""Tests for scripts/prepare_emoji_data.py: names from emoji-datasource, grouping skin tones, the seeded
split by emoji, and the folders it writes, on a tiny fake pair of npm packages (no network)."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from latent_dit.data import scan_dataset

REPO_ROOT = Path(__file__).resolve().parent.parent



from training_helpers import load_script  # noqa: E402

prep = load_script("prepare_emoji_data")

# A slice of emoji-datasource's emoji.json: a plain emoji, one with skin tones, a two-person one with
# two tones per variant, and a keycap whose non-qualified form differs.
EMOJI_JSON = [
    {"name": "GRINNING FACE", "unified": "1F600", "non_qualified": None},
    {"name": "THUMBS UP SIGN", "unified": "1F44D", "non_qualified": None, "skin_variations": {
        "1F3FB": {"unified": "1F44D-1F3FB", "non_qualified": None},
        "1F3FF": {"unified": "1F44D-1F3FF", "non_qualified": None}}},
    {"name": "PEOPLE HOLDING HANDS", "unified": "1F9D1-200D-1F91D-200D-1F9D1", "non_qualified": None, "skin_variations": {
        "1F3FB-1F3FC": {"unified": "1F9D1-1F3FB-200D-1F91D-200D-1F9D1-1F3FC", "non_qualified": None}}},
    {"name": "HASH KEY", "unified": "0023-FE0F-20E3", "non_qualified": "0023-20E3"},
]
ASSETS = ["1f600", "1f44d", "1f44d-1f3fb", "1f44d-1f3ff", "1f9d1-200d-1f91d-200d-1f9d1",
          "1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3fc", "0023-fe0f-20e3",
          "23-fe0f-20e3"]  # the last has no name (the real package ships such unpadded duplicates)


@pytest.fixture
def fake_packages(tmp_path):
    """(assets folder of 32x32 RGBA WebPs: a red square on transparency, emoji.json path)."""
    assets = tmp_path / "fluent" / "assets"
    assets.mkdir(parents=True)
    for i, stem in enumerate(ASSETS):
        image = Image.new("RGBA", (32, 32), (0, 0, 0, 0))  # transparent black: must become white
        image.paste((255, 0, i * 10, 255), (8, 8, 24, 24))
        image.save(assets / f"{stem}.webp", lossless=True)
    emoji_json = tmp_path / "datasource" / "emoji.json"
    emoji_json.parent.mkdir()
    emoji_json.write_text(json.dumps(EMOJI_JSON))
    return assets, emoji_json


def test_names_cover_variants_tones_and_non_qualified_forms(fake_packages):
    names = prep.emoji_names(fake_packages[1])
    assert names["1f600"] == "grinning face"
    assert names["1f44d-1f3fb"] == "thumbs up sign, light skin tone"
    assert names["1f44d-1f3ff"] == "thumbs up sign, dark skin tone"
    assert names["1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3fc"] == "people holding hands, light skin tone, medium-light skin tone"
    assert names["0023-20e3"] == names["0023-fe0f-20e3"] == "hash key"
    assert "23-fe0f-20e3" not in names


@pytest.mark.parametrize("file_name, group", [
    ("1f44d.png", "1f44d"),
    ("1f44d-1f3fb.png", "1f44d"),
    ("1F44D-1F3FF.png", "1f44d"),
    ("1f9d1-1f3fb-200d-1f91d-200d-1f9d1-1f3fc.png", "1f9d1-200d-1f91d-200d-1f9d1"),
    ("1f3c3-1f3fd-200d-2640-fe0f.png", "1f3c3-200d-2640-fe0f"),
    ("0023-fe0f-20e3.png", "0023-fe0f-20e3"),
])
def test_group_drops_only_skin_tone_modifiers(file_name, group):
    assert prep.emoji_group(file_name) == group


def many_emoji(count: int = 300) -> list[str]:
    """File names of `count` emoji, every third with five skin-tone variants."""
    names = []
    for i in range(count):
        base = f"1f{i:03x}"
        names.append(f"{base}.png")
        if i % 3 == 0:
            names += [f"{base}-{tone}.png" for tone in prep.SKIN_TONES]
    return names


def test_split_keeps_each_emoji_on_one_side_and_holds_out_the_fraction():
    names = many_emoji()
    split = prep.split_by_emoji(names, heldout_fraction=0.1, seed=0)
    assert sorted(split["train"] + split["heldout"]) == sorted(names)
    train_groups = {prep.emoji_group(n) for n in split["train"]}
    heldout_groups = {prep.emoji_group(n) for n in split["heldout"]}
    assert not train_groups & heldout_groups
    target = round(0.1 * len(names))
    assert target <= len(split["heldout"]) < target + 6  # overshoots by less than one group of six
    # Whole groups: a held-out emoji with tones has all six of its images held out.
    assert all(sum(prep.emoji_group(n) == g for n in split["heldout"]) in (1, 6) for g in heldout_groups)


def test_split_is_seeded_and_ignores_input_order():
    names = many_emoji()
    first = prep.split_by_emoji(names, seed=0)
    assert prep.split_by_emoji(list(reversed(names)), seed=0) == first
    assert prep.split_by_emoji(names, seed=1)["heldout"] != first["heldout"]
    with pytest.raises(ValueError, match="heldout_fraction"):
        prep.split_by_emoji(names, heldout_fraction=1.0)


def test_build_folder_composites_on_white_names_and_skips_unnamed(fake_packages, tmp_path):
    assets, emoji_json = fake_packages
    out = tmp_path / "emoji"
    result = prep.build_image_folder(assets, prep.emoji_names(emoji_json), out, size=32)
    assert (result["images"], result["written"], result["skipped_unnamed"]) == (8, 7, 1)
    assert result["unnamed"] == ["23-fe0f-20e3.webp"]
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == sorted(f"{s}.png" for s in ASSETS[:-1])
    assert {"file_name": "1f44d-1f3fb.png", "text": "a 3d rendered thumbs up sign, light skin tone emoji"} in rows
    pixels = np.asarray(Image.open(out / "1f600.png"))
    assert Image.open(out / "1f600.png").mode == "RGB" and pixels.shape == (32, 32, 3)
    assert tuple(pixels[0, 0]) == (255, 255, 255)  # transparent -> white, not black
    assert tuple(pixels[16, 16]) == (255, 0, 0)

    resized = prep.build_image_folder(assets, prep.emoji_names(emoji_json), tmp_path / "small", size=16)
    assert resized["written"] == 7 and Image.open(tmp_path / "small" / "1f600.png").size == (16, 16)


def test_written_split_is_read_by_the_training_data_reader(fake_packages, tmp_path):
    assets, emoji_json = fake_packages
    images = tmp_path / "emoji"
    prep.build_image_folder(assets, prep.emoji_names(emoji_json), images, size=32)
    summary = prep.write_split(images, tmp_path / "emoji_split", heldout_fraction=0.3, seed=0)
    assert summary["train_images"] + summary["heldout_images"] == 7 and summary["heldout_images"] >= 2

    records = {}
    for split in prep.SPLITS:
        rows = [json.loads(line) for line in (tmp_path / "emoji_split" / split / "metadata.jsonl").read_text().splitlines()]
        assert all(r["file_name"].startswith("../../emoji/") for r in rows)  # relative: points back, copies nothing
        records[split], data_summary, _ = scan_dataset(str(tmp_path / "emoji_split" / split), show_progress=False)
        assert data_summary.used == len(rows) == summary[f"{split}_images"] and data_summary.total == len(rows)
    train_groups = {prep.emoji_group(r.image) for r in records["train"]}
    assert not train_groups & {prep.emoji_group(r.image) for r in records["heldout"]}
    # `latent-dit train` with data.source=<split> and the default data.split=train reads train/.
    via_split, _, _ = scan_dataset(str(tmp_path / "emoji_split"), split="train", show_progress=False)
    assert [r.image for r in via_split] == [r.image for r in records["train"]]
    assert all(Path(r.image).parent == images.resolve() for r in via_split)


def test_split_only_command(fake_packages, tmp_path):
    assets, emoji_json = fake_packages
    images = tmp_path / "emoji"
    prep.build_image_folder(assets, prep.emoji_names(emoji_json), images, size=32)
    result = prep.main(["--split-only", str(images), "--heldout-fraction", "0.3"])
    split_dir = tmp_path / "emoji_split"  # the default: beside the image folder
    assert json.loads((split_dir / "split.json").read_text())["heldout_images"] == result["split"]["heldout_images"]
    with pytest.raises(SystemExit):
        prep.main(["--split-only", str(images), "--out", str(tmp_path / "x")])


def test_split_of_the_shared_emoji_folder(shared_dir, tmp_path):
    folder = shared_dir / "data" / "emoji_fluent3d_256"
    if not (folder / "metadata.jsonl").is_file():
        pytest.skip(f"{folder} not found")
    summary = prep.write_split(folder, tmp_path / "split")
    assert (summary["train_images"], summary["heldout_images"]) == (3034, 340)
    assert (summary["train_emoji"], summary["heldout_emoji"]) == (1665, 206)
