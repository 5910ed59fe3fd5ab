"""The shareable folder loads two ways: with plain diffusers (`trust_remote_code=True`, latent-dit not
importable; the model card's snippet runs there) and with latent-dit installed (no remote code); both
give the same image."""

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import latent_dit
from latent_dit import model as model_module
from latent_dit.config import Config, to_yaml
from latent_dit.hub import find_pickles, prepare_for_hub, push_pipeline
from latent_dit.pipelines import LatentDiTPipeline
from latent_dit.pipelines import pipeline_latent_dit as pipeline_module
from test_hub import FakeHub, serve_as_the_hub  # the local stand-in for the Hub

PROMPT = "a red circle"


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_training_config(folder: Path, **train):
    cfg = Config()
    cfg.train.validation_prompts, cfg.train.validation_steps = [PROMPT], 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    (folder / "training_config.yaml").write_text(to_yaml(cfg))


@pytest.fixture(scope="module")
def shared_folder(tiny_pipeline_dir, tmp_path_factory) -> Path:
    """The tiny pipeline, saved, plus a training config, made shareable."""
    folder = tmp_path_factory.mktemp("shareable") / "pipeline"
    shutil.copytree(tiny_pipeline_dir, folder)
    write_training_config(folder)
    prepare_for_hub(folder, repo_id="me/tiny-dit")
    return folder


def test_model_index_points_at_the_shipped_code(shared_folder):
    index = json.loads((shared_folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_latent_dit", "LatentDiTPipeline"]
    assert index["transformer"] == ["modeling_latent_dit", "LatentDiTTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert (shared_folder / "pipeline_latent_dit.py").read_text() == Path(pipeline_module.__file__).read_text()
    assert (shared_folder / "transformer" / "modeling_latent_dit.py").read_text() == Path(model_module.__file__).read_text()
    weights = sorted(p.name for p in shared_folder.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".ckpt"))
    assert weights and all(name.endswith(".safetensors") for name in weights) and find_pickles(shared_folder) == []
    assert {"README.md", "samples.png", "samples.txt", "training_config.yaml"} <= {p.name for p in shared_folder.iterdir()}


@pytest.mark.parametrize("module", [pipeline_module, model_module], ids=["pipeline", "model"])
def test_shipped_code_imports_only_torch_diffusers_and_the_standard_library(module):
    # The copies run where latent-dit is not installed: one import of latent_dit (or a relative one) breaks them.
    allowed = {"torch", "diffusers", "transformers"} | set(sys.stdlib_module_names)
    tree = ast.parse(Path(module.__file__).read_text())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import in {module.__file__}: line {node.lineno}"
            roots.add(node.module.split(".")[0])
    assert roots and roots <= allowed, roots - allowed


def test_installed_latent_dit_loads_it_without_remote_code(shared_folder):
    # No trust_remote_code: the installed classes stand in for the folder's copies, which never run.
    for pipe in (LatentDiTPipeline.from_pretrained(shared_folder), DiffusionPipeline.from_pretrained(shared_folder)):
        assert type(pipe) is LatentDiTPipeline
        assert type(pipe.transformer) is latent_dit.LatentDiTTransformer2DModel
    assert not any(name.startswith("diffusers_modules") and "latent_dit" in name for name in sys.modules)


def test_prepare_for_hub_is_idempotent(shared_folder):
    before = folder_digest(shared_folder)
    prepare_for_hub(shared_folder, repo_id="me/tiny-dit")
    assert folder_digest(shared_folder) == before


def test_save_pretrained_then_prepare_gives_the_full_folder(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()
    prepare_for_hub(tmp_path)
    names = {p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()}
    assert {"README.md", "samples.png", "samples.txt", "pipeline_latent_dit.py", "transformer/modeling_latent_dit.py"} <= names
    # Drawn with the default validation prompts, as a run without a training config would.
    assert (tmp_path / "samples.txt").read_text().splitlines() == Config().train.validation_prompts


def test_prepare_refuses_a_folder_that_is_not_a_latent_dit_pipeline(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        prepare_for_hub(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "X", "unet": ["diffusers", "UNet2DModel"]}))
    with pytest.raises(ValueError, match="not a latent-dit pipeline"):
        prepare_for_hub(tmp_path)


ISOLATED_SCRIPT = r"""
import importlib.util, json, sys
sys.path.extend(sys.argv[4:])  # site-packages, without its .pth files: latent-dit's editable finder stays out
assert importlib.util.find_spec("latent_dit") is None, "latent_dit is importable in the isolated interpreter"
import numpy as np, torch
from diffusers import DiffusionPipeline

folder, out, snippet = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    DiffusionPipeline.from_pretrained(folder)
    refused = None
except ValueError as error:
    refused = str(error)
exec(snippet, {})  # the model card's usage snippet, the repo id replaced by the folder
modules = {}
for name, source in (("folder", folder), ("hub", "me/tiny-dit")):  # the folder, and the repo on the (fake) Hub
    pipe = DiffusionPipeline.from_pretrained(source, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(%r, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.save(f"{out}/{name}.npy", images)
    modules[name] = [type(pipe).__module__, type(pipe.transformer).__module__]
print(json.dumps({"refused": refused, "modules": modules,
                  "latent_dit_loaded": [m for m in sys.modules if m.split(".")[0] == "latent_dit"]}))
""" % PROMPT


@pytest.fixture(scope="module")
def plain_diffusers_run(shared_folder, tmp_path_factory) -> tuple[dict, Path]:
    """One interpreter without latent-dit (one, because importing torch and diffusers is most of the cost): it
    tries the folder without trust_remote_code, runs the card's snippet, and draws an image with the remote
    code, from the folder and from the folder pushed to a (fake, local) Hub."""
    work = tmp_path_factory.mktemp("plain-diffusers")
    fake_hub = FakeHub()
    with pytest.MonkeyPatch.context() as monkeypatch:
        serve_as_the_hub(monkeypatch, fake_hub, work)
        push_pipeline(shared_folder, "me/tiny-dit")
    (snippet,) = re.findall(r"```python\n(.*?)```", (shared_folder / "README.md").read_text(), flags=re.DOTALL)
    assert '"me/tiny-dit"' in snippet
    snippet = snippet.replace('"me/tiny-dit"', repr(str(shared_folder)))
    site = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    env = {**os.environ, "HF_MODULES_CACHE": str(work / "modules"), "OMP_NUM_THREADS": "1", "HF_ENDPOINT": fake_hub.url,
           "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", "HF_HUB_CACHE": str(work / "hub-cache"), "HF_TOKEN": ""}
    # -I: no PYTHONPATH, user site or current folder; -S: no site-packages .pth files (the editable install).
    result = subprocess.run(
        [sys.executable, "-I", "-S", "-c", ISOLATED_SCRIPT, str(shared_folder), str(work), snippet, *site],
        cwd=work, env=env, capture_output=True, text=True, timeout=300,
    )
    fake_hub.server.shutdown()
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["latent_dit_loaded"] == []
    return report, work


def test_plain_diffusers_asks_for_trust_remote_code(plain_diffusers_run):
    report, _ = plain_diffusers_run
    assert report["refused"] is not None and "trust_remote_code=True" in report["refused"]


def test_the_card_snippet_runs_with_plain_diffusers(plain_diffusers_run):
    _, work = plain_diffusers_run
    assert Image.open(work / "image.png").size == (16, 16)


@pytest.mark.parametrize("source", ["folder", "hub"])
def test_plain_diffusers_draws_the_same_image_as_the_installed_pipeline(plain_diffusers_run, shared_folder, source):
    report, work = plain_diffusers_run
    assert all(module.startswith("diffusers_modules") for module in report["modules"][source])  # the shipped copies ran
    pipe = LatentDiTPipeline.from_pretrained(shared_folder)
    pipe.set_progress_bar_config(disable=True)
    installed = pipe(PROMPT, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    remote = np.load(work / f"{source}.npy")
    assert remote.shape == installed.shape == (1, 16, 16, 3) and installed.std() > 0.01
    np.testing.assert_allclose(remote, installed, atol=1e-5)
