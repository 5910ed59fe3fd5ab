"""`latent-dit generate`: files written, sizes, seeded determinism, and clear errors for bad models and sizes."""

import numpy as np
import PIL.Image
import pytest

from latent_dit.cli import main


def _generate(model, out, *extra, seed=1, height=16, width=24, num_images=2):
    main(["generate", "a red fox", "--model", str(model), "--steps", "2", "--seed", str(seed), "--height", str(height),
          "--width", str(width), "--out", str(out), "--num-images", str(num_images), *extra])


def test_generate_writes_one_png_per_image(tiny_pipeline_dir, tmp_path, capsys):
    _generate(tiny_pipeline_dir, tmp_path / "out" / "x.png")
    paths = sorted((tmp_path / "out").iterdir())
    assert [p.name for p in paths] == ["x-0.png", "x-1.png"]
    printed = capsys.readouterr().out
    for path in paths:
        with PIL.Image.open(path) as image:
            assert image.format == "PNG" and image.size == (24, 16) and image.mode == "RGB"
        assert f"saved {path}" in printed
    first, second = (np.asarray(PIL.Image.open(p)) for p in paths)
    assert np.abs(first.astype(int) - second.astype(int)).max() > 0  # two different samples


def test_single_image_keeps_the_given_name(tiny_pipeline_dir, tmp_path, capsys):
    _generate(tiny_pipeline_dir, tmp_path / "single.png", num_images=1)
    assert [p.name for p in tmp_path.iterdir()] == ["single.png"]
    assert f"saved {tmp_path / 'single.png'}" in capsys.readouterr().out


def test_same_seed_same_files_other_seed_other_files(tiny_pipeline_dir, tmp_path):
    _generate(tiny_pipeline_dir, tmp_path / "a" / "x.png", seed=7)
    _generate(tiny_pipeline_dir, tmp_path / "b" / "x.png", seed=7)
    _generate(tiny_pipeline_dir, tmp_path / "c" / "x.png", seed=8)
    for name in ("x-0.png", "x-1.png"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
        assert (tmp_path / "a" / name).read_bytes() != (tmp_path / "c" / name).read_bytes()


def test_images_match_the_pipeline(tiny_pipeline_dir, tmp_path):
    import torch

    from latent_dit.components import load_pipeline

    pipe = load_pipeline(str(tiny_pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    drawn = []
    for interval in ((0.0, 1.0), (0.7, 1.0)):
        _generate(tiny_pipeline_dir, tmp_path / "x.png", "--guidance", "3", "--guidance-interval", *map(str, interval),
                  seed=3, num_images=1)
        expected = pipe("a red fox", height=16, width=24, num_inference_steps=2, guidance_scale=3.0,
                        guidance_interval=interval, generator=torch.Generator().manual_seed(3)).images[0]
        drawn.append(np.asarray(PIL.Image.open(tmp_path / "x.png")))
        np.testing.assert_array_equal(drawn[-1], np.asarray(expected))
    assert not np.array_equal(*drawn)  # the interval reached the pipeline


def test_bfloat16(tiny_pipeline_dir, tmp_path):
    _generate(tiny_pipeline_dir, tmp_path / "x.png", "--dtype", "bfloat16", num_images=1)
    with PIL.Image.open(tmp_path / "x.png") as image:
        assert image.size == (24, 16)


def test_missing_model_exits_naming_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(SystemExit) as excinfo:
        _generate(missing, tmp_path / "x.png")
    assert str(missing) in str(excinfo.value.code) and "does not exist" in str(excinfo.value.code)
    assert not (tmp_path / "x.png").exists()


def test_unknown_hub_id_exits_naming_it(tmp_path):
    # No path separator: looked up as a Hub id, which fails offline; the error still names it.
    with pytest.raises(SystemExit) as excinfo:
        _generate("no-such-user-xyz/no-such-model", tmp_path / "x.png")
    assert "could not load model 'no-such-user-xyz/no-such-model'" in str(excinfo.value.code)


def test_bad_size_exits_with_the_valid_sizes(tiny_pipeline_dir, tmp_path):
    with pytest.raises(SystemExit) as excinfo:
        _generate(tiny_pipeline_dir, tmp_path / "x.png", height=18)
    assert "multiples of 4" in str(excinfo.value.code) and "16×24 or 20×28" in str(excinfo.value.code)


def test_tiny_random(tmp_path, capsys):
    main(["generate", "a red fox", "--tiny-random", "--steps", "2", "--out", str(tmp_path / "tiny.png")])
    with PIL.Image.open(tmp_path / "tiny.png") as image:
        assert image.size == (16, 16)
    assert "RANDOM" in capsys.readouterr().out


def test_missing_prompt_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["generate"])
    assert excinfo.value.code == 2 and "prompt" in capsys.readouterr().err


def test_without_guidance_the_model_own_default_is_used(tiny_pipeline_dir, tmp_path):
    import json
    import shutil

    import torch

    from latent_dit.components import load_pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_pipeline_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    (model / "model_index.json").write_text(json.dumps({**index, "default_guidance_scale": 1.0}))
    _generate(model, tmp_path / "x.png", seed=3, num_images=1)
    pipe = load_pipeline(str(model))
    pipe.set_progress_bar_config(disable=True)
    drawn = np.asarray(PIL.Image.open(tmp_path / "x.png"))

    def draw(guidance):
        return np.asarray(pipe("a red fox", height=16, width=24, num_inference_steps=2, guidance_scale=guidance,
                               generator=torch.Generator().manual_seed(3)).images[0])
    np.testing.assert_array_equal(drawn, draw(1.0))
    assert not np.array_equal(drawn, draw(4.5))
