"""Tests for latent_dit.config and the YAML files in configs/: every config loads with the program its
opening comment names, lists only what differs from the defaults, and the DiT presets have the paper's
sizes; unknown keys and wrong types are errors that name the key."""

import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest
import torch
import yaml

from latent_dit.config import Config, ConfigError, load_config, model_differences, to_yaml, transformer_kwargs
from latent_dit.model import PRESETS, LatentDiTTransformer2DModel

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.yaml"))
TRAIN_COMMAND = re.compile(r"(latent-dit train|-m latent_dit\.train) .*--config configs/(?P<name>[\w.-]+\.yaml)")
SCRIPT_COMMAND = re.compile(r"python (?P<script>scripts/\w+\.py) --config configs/(?P<name>[\w.-]+\.yaml)")


def opening_comment(path: Path) -> str:
    lines = path.read_text().splitlines()
    return "\n".join(line for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))])


def is_training_config(path: Path) -> bool:
    return any(m["name"] == path.name for m in TRAIN_COMMAND.finditer(opening_comment(path)))


def script_loader(script: str):
    spec = importlib.util.spec_from_file_location(Path(script).stem, CONFIGS.parent / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


# ---------------------------------------------------------------- the files in configs/


def test_configs_folder_has_the_dit_presets_and_the_cpu_smoke_config():
    names = {path.stem for path in CONFIG_FILES}
    assert {"tiny-cpu", "dit-s2-256", "dit-s2-512", "dit-b2-256", "dit-b2-512", "dit-xl2-256", "dit-xl2-512"} <= names


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.name)
def test_every_config_loads_with_the_program_its_opening_comment_runs(path):
    comment = opening_comment(path)
    assert len(path.read_text().splitlines()) < 40, f"{path.name}: keep configs under 40 lines"
    assert len(comment.splitlines()) >= 2, f"{path.name}: open with a comment giving the purpose and the command"
    if is_training_config(path):
        cfg = load_config(path)
        transformer_kwargs(cfg.model)  # the preset and size overrides make a model
        assert cfg.train.output_dir.startswith("runs/")
    else:
        script = SCRIPT_COMMAND.search(comment)
        assert script and script["name"] == path.name, f"{path.name}: its opening comment names no command that reads it"
        script_loader(script["script"])(path)


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if is_training_config(p)], ids=lambda p: p.name)
def test_training_configs_list_only_what_differs_from_the_defaults(path):
    defaults = dataclasses.asdict(Config())
    tree = yaml.safe_load(path.read_text())
    same = [f"{section}.{key}" for section, values in tree.items() for key, value in values.items()
            if value == defaults[section][key] and f"{section}.{key}" != "model.preset"]  # the preset names the size
    assert not same, f"{path.name} repeats defaults: {same}"


@pytest.mark.parametrize("name", ["dit-s2-256", "dit-s2-512", "dit-b2-256", "dit-b2-512", "dit-xl2-256", "dit-xl2-512"])
def test_dit_presets_have_the_paper_sizes_and_their_resolution(name):
    size, resolution = re.fullmatch(r"dit-(s|b|xl)2-(\d+)", name).groups()
    cfg = load_config(CONFIGS / f"{name}.yaml")
    preset = f"DiT-{size.upper()}/2"
    assert cfg.model.preset == preset and cfg.data.resolution == int(resolution)
    kwargs = transformer_kwargs(cfg.model)
    assert {k: kwargs[k] for k in PRESETS[preset]} == PRESETS[preset]
    assert (kwargs["depth"], kwargs["hidden_size"], kwargs["num_heads"]) == {
        "s": (12, 384, 6), "b": (12, 768, 12), "xl": (28, 1152, 16)}[size]  # DiT paper, Table 1
    assert cfg.train.mixed_precision == "bf16" and cfg.data.cache_dir
    assert f"--config configs/{name}.yaml" in opening_comment(CONFIGS / f"{name}.yaml")


# ---------------------------------------------------------------- load_config


def test_defaults_overrides_and_yaml_values(tmp_path):
    path = write(tmp_path, "train:\n  learning_rate: 1e-4\n  max_steps: 5\ndata:\n  source: imgs\n")
    cfg = load_config(path, ["train.max_steps=7", "train.validation_prompts=[a, b]", "components.vae=null",
                             "model.depth=3", "train.snr_gamma=5", "model.cross_attention_norm=true"])
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)  # YAML reads 1e-4 as a string
    assert (cfg.train.max_steps, cfg.train.validation_prompts, cfg.components.vae) == (7, ["a", "b"], None)
    assert cfg.model.depth == 3 and transformer_kwargs(cfg.model)["depth"] == 3
    assert transformer_kwargs(cfg.model)["cross_attention_norm"] is True
    assert cfg.train.snr_gamma == 5.0 and isinstance(cfg.train.snr_gamma, float)
    assert cfg.data.source == "imgs" and cfg.data.resolution == 256  # untouched keys keep their defaults
    assert load_config() == Config()


@pytest.mark.parametrize("overrides, design", [
    ([], (True, False)),  # text: PixArt-α's blocks
    (["model.conditioning=class"], (False, True)),  # class and unconditional: DiT's per-block adaLN
    (["model.conditioning=none"], (False, True)),
    (["model.adaln_single=false"], (False, True)),  # the norm follows the adaLN choice unless set
    (["model.conditioning=class", "model.adaln_single=true"], (True, False)),
    (["model.adaln_single=false", "model.cross_attention_norm=false"], (False, False)),
    (["model.cross_attention_norm=true"], (True, True)),
])
def test_block_design_defaults_by_conditioning_and_explicit_values_win(overrides, design):
    kwargs = transformer_kwargs(load_config(None, overrides).model)
    assert (kwargs["adaln_single"], kwargs["cross_attention_norm"]) == design
    model = LatentDiTTransformer2DModel(**{**kwargs, "depth": 1, "hidden_size": 32, "num_heads": 2}, sample_size=4,
                                        text_embed_dim=16)
    assert (model.shared_modulation is not None) == design[0]
    if kwargs["conditioning"] == "text":
        assert isinstance(model.blocks[0].norm_cross, torch.nn.LayerNorm) == design[1]


def test_model_differences_name_the_overrides_that_rebuild_a_saved_run(tmp_path):
    saved = write(tmp_path, "model:\n  depth: 6\n  adaln_single: false\n  conditioning: text\n")
    assert model_differences(saved, load_config(None, ["model.depth=6"]).model) == [
        "model.adaln_single=false", "model.cross_attention_norm=true"]
    assert model_differences(saved, load_config(saved).model) == []


def test_yes_and_no_are_strings_as_in_yaml_1_2(tmp_path):
    # Accelerate spells "no mixed precision" as `no`; YAML 1.1 would read it as False.
    cfg = load_config(write(tmp_path, "train:\n  mixed_precision: no\n  use_compile: true\n"), ["data.random_flip=True"])
    assert (cfg.train.mixed_precision, cfg.train.use_compile, cfg.data.random_flip) == ("no", True, True)
    assert load_config(None, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match=r"data.center_crop: expected bool, got 'yes' \(str\)"):
        load_config(None, ["data.center_crop=yes"])


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(CONFIGS / "dit-xl2-512.yaml", ["train.seed=3"])
    assert load_config(write(tmp_path, to_yaml(cfg))) == cfg


@pytest.mark.parametrize("text, overrides, message", [
    ("optimizer:\n  lr: 1\n", [], r"Unknown config key 'optimizer'; valid keys here: model, data, components, train"),
    ("train:\n  lr: 1\n", [], r"Unknown config key 'train.lr'; valid keys here: output_dir, .*learning_rate"),
    ("data:\n  resolutoin: 64\n", [], r"Unknown config key 'data.resolutoin'"),
    ("", ["train.learning_rat=1e-3"], r"Unknown config key 'train.learning_rat'"),
    ("", ["train.max_steps.deep=1"], r"train.max_steps: expected int, got \{'deep': 1\}"),
    ("train: 5\n", [], r"train: expected a mapping of keys, got 5"),
], ids=["section", "train key", "data typo", "override", "not a section", "section not a mapping"])
def test_unknown_keys_are_errors_that_name_the_key(tmp_path, text, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text), overrides)


@pytest.mark.parametrize("override, message", [
    ("train.max_steps=many", r"train.max_steps: expected int, got 'many' \(str\)"),
    ("train.max_steps=true", r"train.max_steps: expected int, got True \(bool\)"),
    ("train.max_steps=1.5", r"train.max_steps: expected int, got 1.5 \(float\)"),
    ("train.max_steps=null", r"train.max_steps: expected int, got None"),
    ("train.learning_rate=fast", r"train.learning_rate: expected float, got 'fast'"),
    ("data.center_crop=1", r"data.center_crop: expected bool, got 1 \(int\)"),
    ("data.source=5", r"data.source: expected str, got 5 \(int\)"),
    ("train.validation_prompts=a cat", r"train.validation_prompts: expected a list, got 'a cat'"),
    ("train.validation_class_labels=[0, x]", r"train.validation_class_labels\[1\]: expected int, got 'x'"),
    ("model.prediction_type=x0", r"model.prediction_type: 'x0' is not one of \('epsilon', 'v_prediction', 'flow'\)"),
    ("model.preset=DiT-M/2", r"model.preset: 'DiT-M/2' is not one of \('DiT-S/2'"),
    ("train.mixed_precision=fp8", r"train.mixed_precision: 'fp8' is not one of"),
])
def test_wrong_types_and_values_are_errors_that_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_bad_override_syntax_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"--set 'train.max_steps': write it as section.key=value"):
        load_config(None, ["train.max_steps"])
    with pytest.raises(ConfigError, match=r"Config file '.*nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")
