"""Shared fixtures: offline Hugging Face, the shared assets folder, and tiny random pipelines."""

import os

# Tests never reach a model hub: everything is built from configs or read from the shared folder.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent

# The models here are tiny: thread hand-offs cost more than the maths, and under pytest-xdist each worker is
# already one process per core, so more torch threads per worker only oversubscribe the cores.
torch.set_num_threads(1)


def shared_root() -> Path:
    """`$LATENT_DIT_SHARED`, or `shared/` beside the repository checkout."""
    return Path(os.environ.get("LATENT_DIT_SHARED", REPO_ROOT.parent / "shared"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    path = shared_root()
    if not (path / "assets").is_dir():
        pytest.skip(f"shared assets folder not found at {path} (set LATENT_DIT_SHARED to the folder holding assets/ and data/)")
    return path


@pytest.fixture(autouse=True)
def _seed():
    # Every test starts from the same global RNG state, whatever ran before it on this worker.
    torch.manual_seed(0)


@pytest.fixture
def fresh_accelerate_state():
    """Accelerate's state is a process-wide singleton: a test that builds an Accelerator with other settings
    (mixed precision, a fresh "process") resets it, and leaves none behind for the next test."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    reset()
    yield reset
    reset()


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A saved tiny random text-to-image pipeline (AutoencoderKL ×2, CLIP text encoder, depth-2 DiT)."""
    from latent_dit.tiny import make_tiny_pipeline

    path = tmp_path_factory.mktemp("tiny-pipeline")
    make_tiny_pipeline(path)
    return path


@pytest.fixture
def tiny_pipe():
    """A fresh tiny random text-to-image pipeline; each test may change its scheduler or settings."""
    from latent_dit.tiny import make_tiny_pipeline

    pipe = make_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def make_tiny_autoencoder_tiny():
    """Factory for a 2-level random `AutoencoderTiny` (TAESD's architecture, downsamples ×2, 4 latent channels)."""
    from diffusers import AutoencoderTiny

    def make(seed: int = 0, **overrides):
        torch.manual_seed(seed)
        config = dict(
            in_channels=3, out_channels=3, encoder_block_out_channels=(16, 16), decoder_block_out_channels=(16, 16),
            num_encoder_blocks=(1, 1), num_decoder_blocks=(1, 1), latent_channels=4, upsampling_scaling_factor=2,
        )
        return AutoencoderTiny(**{**config, **overrides}).eval()

    return make
