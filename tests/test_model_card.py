"""The model card: Hub metadata, a usage snippet that runs against the folder, samples and training config."""

import re
import shutil
from pathlib import Path

import pytest
import yaml
from huggingface_hub import ModelCard
from PIL import Image

from latent_dit.config import Config, to_yaml
from latent_dit.hub import prepare_for_hub
from latent_dit.model_card import GENERATED_MARKER, hub_id_or_none, render_model_card
from latent_dit.tiny import make_tiny_pipeline

PROMPT = "a green square"
REPO = "someone/tiny-dit"


def training_config(folder: Path, **sections) -> Config:
    cfg = Config()
    cfg.train.validation_prompts, cfg.train.validation_steps, cfg.train.guidance_scale = [PROMPT, "a red circle"], 2, 3.0
    cfg.train.max_steps, cfg.train.batch_size = 1234, 16
    for dotted, value in sections.items():
        section, key = dotted.split("__")
        setattr(getattr(cfg, section), key, value)
    (folder / "training_config.yaml").write_text(to_yaml(cfg))
    return cfg


def copy_pipeline(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    return folder


@pytest.fixture(scope="module")
def fine_tuned(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """A folder as the end-of-training export leaves it, for a run fine-tuned from a Hub model on a Hub dataset."""
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path_factory.mktemp("card") / "pipeline")
    training_config(folder, train__init_from="someone/base-dit", data__source="someone/shapes-captions")
    prepare_for_hub(folder, repo_id=REPO)
    return folder


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_card_parses_and_carries_the_hub_metadata(fine_tuned):
    card = ModelCard.load(fine_tuned / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and data["pipeline_tag"] == "text-to-image"
    assert {"latent-dit", "diffusers", "text-to-image"} <= set(data["tags"])
    assert data["license"] == "apache-2.0"
    assert data["base_model"] == "someone/base-dit"
    assert data["datasets"] == ["someone/shapes-captions"]
    assert GENERATED_MARKER in card.text


def test_card_shows_the_samples_and_the_training(fine_tuned):
    text = (fine_tuned / "README.md").read_text()
    assert "![Samples](samples.png)" in text
    titles = (fine_tuned / "samples.txt").read_text().splitlines()
    assert titles == [PROMPT, "a red circle"]
    assert all(f"{i}. {title}" in text for i, title in enumerate(titles, 1))
    assert Image.open(fine_tuned / "samples.png").size == (2 * 16, 16)  # one 16-px tile per prompt
    assert "1234 optimizer steps of 16 images" in text
    config_block = re.search(r"```yaml\n(.*?)```", text, flags=re.DOTALL).group(1)
    assert yaml.safe_load(config_block) == yaml.safe_load((fine_tuned / "training_config.yaml").read_text())
    assert "depth 2, width 32, 4 heads, patch 2" in text and "[someone/base-dit](https://huggingface.co/someone/base-dit)" in text


def test_local_paths_stay_out_of_the_metadata(tiny_pipeline_dir, tmp_path):
    folder = copy_pipeline(tiny_pipeline_dir, tmp_path / "pipeline")
    training_config(folder, train__init_from=str(tmp_path), data__source=str(tmp_path))
    data = ModelCard(render_model_card(folder)).data.to_dict()
    assert "base_model" not in data and "datasets" not in data
    assert hub_id_or_none("user/name") == "user/name" and hub_id_or_none("../data/x") is None and hub_id_or_none(None) is None


def test_explicit_metadata_wins_and_survives_a_later_prepare(fine_tuned, tmp_path):
    folder = copy_pipeline(fine_tuned, tmp_path / "pipeline")
    prepare_for_hub(folder, repo_id=REPO, license="mit", datasets=["other/data"])
    prepare_for_hub(folder, repo_id=REPO)  # no arguments: the card's own metadata is kept
    data = ModelCard.load(folder / "README.md").data.to_dict()
    assert data["license"] == "mit" and data["datasets"] == ["other/data"] and data["base_model"] == "someone/base-dit"


def test_a_card_edited_by_hand_is_kept(fine_tuned, tmp_path):
    folder = copy_pipeline(fine_tuned, tmp_path / "pipeline")
    edited = (folder / "README.md").read_text().replace(GENERATED_MARKER, "My own words.")
    (folder / "README.md").write_text(edited)
    prepare_for_hub(folder, repo_id="someone/else")
    assert (folder / "README.md").read_text() == edited


def test_class_conditional_card(tmp_path):
    make_tiny_pipeline(tmp_path, conditioning="class", num_classes=3)
    card = ModelCard(render_model_card(tmp_path, repo_id=REPO))
    assert card.data.pipeline_tag == "unconditional-image-generation"
    (snippet,) = python_blocks(card.text)
    assert "class_labels=[0]" in snippet and "pipe(" in snippet


def test_the_snippet_loads_the_repo_with_remote_code(fine_tuned):
    # It runs, with plain diffusers, in test_remote_code.py.
    (snippet,) = python_blocks((fine_tuned / "README.md").read_text())
    assert f'DiffusionPipeline.from_pretrained("{REPO}", trust_remote_code=True)' in snippet
    assert f'pipe("{PROMPT}", num_inference_steps=2, guidance_scale=3.0' in snippet
    compile(snippet, "README.md", "exec")
