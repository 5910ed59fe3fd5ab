"""Training configuration: typed dataclasses, read from YAML with dotted `--set key=value` overrides.

A YAML file lists only what differs from the defaults below, in sections `model`, `data`,
`components` and `train`. Unknown keys and values of the wrong type are errors that name the key.
"""

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .components import DEFAULT_TEXT_ENCODER, DEFAULT_VAE
from .model import PRESETS


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and the fix."""


@dataclass
class ModelConfig:
    preset: str = "DiT-S/2"  # a DiT paper size ("DiT-XL/2", ...); the fields below override it
    conditioning: str = "text"  # text | class | none
    prediction_type: str = "epsilon"  # epsilon | v_prediction | flow
    hidden_size: int | None = None  # overrides the preset's width
    depth: int | None = None  # overrides the preset's number of blocks
    num_heads: int | None = None  # overrides the preset's attention heads
    patch_size: int | None = None  # overrides the preset's patch size
    use_qk_norm: bool = False  # RMSNorm on queries and keys
    adaln_single: bool | None = None  # one adaLN regressor shared by all blocks (PixArt-α); null: on for text, off for class/none (DiT)
    cross_attention_norm: bool | None = None  # LayerNorm before cross-attention; null: off with adaln_single (PixArt-α), on without


@dataclass
class DataConfig:
    source: str = ""  # image folder, saved `datasets` folder, or Hub dataset id
    image_column: str = "image"  # image column of a `datasets` dataset
    caption_column: str = "text"  # caption column (also the metadata.jsonl/csv key)
    split: str = "train"  # split of a `datasets` dataset
    class_folders: bool = False  # one sub-folder per class (for conditioning: class)
    resolution: int = 256  # training size in pixels (the bucket area when use_buckets)
    center_crop: bool = True  # center crop; False crops at random
    random_flip: bool = False  # horizontal flips
    use_buckets: bool = False  # aspect-ratio bucketing around resolution²
    empty_caption: str = "skip"  # skip | keep images whose caption is missing or empty
    caption_dropout: float = 0.1  # share of captions/labels replaced by the null condition (for CFG)
    max_text_length: int = 77  # tokens per caption
    cache_dir: str | None = None  # latent/text cache from `latent-dit cache`; used when present and valid
    num_workers: int = 2  # DataLoader worker processes


@dataclass
class ComponentsConfig:
    vae: str | None = DEFAULT_VAE  # Hub id or folder of a diffusers VAE; null trains in pixel space
    vae_subfolder: str | None = None  # e.g. "vae" to take it from a full pipeline repo
    text_encoder: str = DEFAULT_TEXT_ENCODER  # Hub id or folder of a transformers text encoder (+ tokenizer)
    text_encoder_subfolder: str | None = None  # e.g. "text_encoder" in a pipeline repo
    tokenizer_subfolder: str | None = None  # e.g. "tokenizer" in a pipeline repo


@dataclass
class TrainConfig:
    output_dir: str = "runs/latent-dit"  # checkpoints, logs, samples and the exported pipeline go here
    init_from: str | None = None  # pipeline folder or Hub id to fine-tune (reuses its VAE and text encoder)
    seed: int = 0  # seeds init, data order, noise and dropout
    max_steps: int = 10000  # optimizer steps in the whole run
    batch_size: int = 32  # images per process per micro-step
    gradient_accumulation_steps: int = 1  # micro-steps per optimizer step
    learning_rate: float = 1e-4  # AdamW peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    lr_schedule: str = "constant"  # constant | cosine (both after linear warmup)
    warmup_steps: int = 0  # linear warmup, in optimizer steps
    max_grad_norm: float = 1.0  # gradient clipping; 0 disables it
    mixed_precision: str = "no"  # no | bf16 | fp16 (Accelerate autocast)
    gradient_checkpointing: bool = False  # trade compute for activation memory
    use_compile: bool = False  # torch.compile each transformer block (compiled once, reused by all)
    ema_decay: float = 0.9999  # EMA of the weights, used for sampling and export
    beta_schedule: str = "linear"  # DDPM betas for epsilon/v: linear | scaled_linear | squaredcos_cap_v2
    snr_gamma: float | None = None  # min-SNR-γ loss weighting (5.0 is the paper's); null disables it
    logit_normal_mean: float = 0.0  # flow: timestep sampling σ = sigmoid(N(mean, std))
    logit_normal_std: float = 1.0
    log_every: int = 10  # steps between loss logs (the only host syncs)
    checkpoint_every: int = 500  # steps between checkpoints
    keep_checkpoints: int = 3  # newest checkpoints kept
    validate_every: int = 500  # steps between validation grids; 0 disables them
    validation_prompts: list[str] = field(default_factory=lambda: ["a 3d rendered red apple emoji", "a 3d rendered smiling face emoji"])
    validation_class_labels: list[int] = field(default_factory=lambda: [0, 1])  # class models
    validation_steps: int = 20  # sampler steps for validation images
    guidance_scale: float = 4.5  # guidance for validation images
    report_to: str = "tensorboard"  # tensorboard | wandb | none
    push_to_hub: bool = False  # push the exported pipeline at the end
    hub_repo: str | None = None  # user/name for push_to_hub
    push_checkpoints: bool = False  # with push_to_hub, also upload each checkpoint to the repo's "checkpoints" branch, in the background


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


CHOICES = {
    "model.preset": tuple(PRESETS),
    "model.conditioning": ("text", "class", "none"),
    "model.prediction_type": ("epsilon", "v_prediction", "flow"),
    "data.empty_caption": ("skip", "keep"),
    "train.lr_schedule": ("constant", "cosine"),
    "train.mixed_precision": ("no", "bf16", "fp16"),
    "train.beta_schedule": ("linear", "scaled_linear", "squaredcos_cap_v2"),
    "train.report_to": ("tensorboard", "wandb", "none"),
}


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false. PyYAML's YAML 1.1 also reads yes/no/on/off as booleans, which
    would turn `mixed_precision: no` (Accelerate's own spelling) into False."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YamlLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _coerce(value, hint, key: str):
    """Check `value` against a type hint (int, float, str, bool, X | None, list[X]); ints pass as floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (inner,) = typing.get_args(hint)
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):  # YAML reads "1e-4" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {hint.__name__}, got {value!r} ({type(value).__name__})")
    return value


def _build(cls, values: dict, prefix: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping of keys, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(f"Unknown config key {dotted!r}; valid keys here: {', '.join(fields)}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = _build(hints[key], value, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, hints[key], dotted)
            if dotted in CHOICES and kwargs[key] not in CHOICES[dotted]:
                raise ConfigError(f"{dotted}: {kwargs[key]!r} is not one of {CHOICES[dotted]}")
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value):
    *parents, leaf = dotted.split(".")
    for part in parents:
        tree = tree.setdefault(part, {})
        if not isinstance(tree, dict):
            raise ConfigError(f"--set {dotted}: {part!r} is not a section")
    tree[leaf] = value


def load_config(path: str | Path | None = None, overrides: list[str] = (), schema=Config):
    """Read a YAML config and apply `key=value` overrides (values parsed as YAML: 3e-4, true, [a, b]).

    `schema` is the dataclass to build (`Config` for `latent-dit train`; scripts pass their own)."""
    tree = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"Config file {str(path)!r} does not exist (see configs/ for examples).")
        tree = yaml.load(path.read_text(), Loader=_YamlLoader) or {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: write it as section.key=value, e.g. train.learning_rate=3e-4")
        key, raw = item.split("=", 1)
        _set_dotted(tree, key.strip(), yaml.load(raw, Loader=_YamlLoader))
    return _build(schema, tree, "")


def to_yaml(config) -> str:
    """The resolved config, as saved into the run folder and every checkpoint."""
    return yaml.safe_dump(dataclasses.asdict(config), sort_keys=False)


def block_design(model: ModelConfig) -> dict:
    """`adaln_single` and `cross_attention_norm` with their nulls resolved. Text models get PixArt-α's blocks (one
    adaLN regressor shared by all blocks, no LayerNorm before cross-attention): a quarter fewer parameters and less
    training memory than DiT's per-block regressors, and the same held-out FID on the emoji set
    (docs/benchmarks.md). Class and unconditional models keep DiT's per-block adaLN-Zero, as in the paper."""
    adaln_single = model.conditioning == "text" if model.adaln_single is None else model.adaln_single
    norm = (not adaln_single) if model.cross_attention_norm is None else model.cross_attention_norm
    return {"adaln_single": adaln_single, "cross_attention_norm": norm}


def model_differences(saved_config: str | Path, model: ModelConfig) -> list[str]:
    """`--set` overrides that give `model` the architecture of the run whose resolved config is `saved_config`
    (a checkpoint's config.yaml): one per model setting that differs once nulls and the preset are resolved."""
    saved = transformer_kwargs(load_config(saved_config).model)
    now = transformer_kwargs(model)
    return [f"model.{key}={yaml.safe_dump(saved[key]).splitlines()[0]}" for key in saved if saved[key] != now.get(key)]


def transformer_kwargs(model: ModelConfig) -> dict:
    """The preset's sizes with this config's overrides, plus the non-size fields, for the model constructor."""
    if model.preset not in PRESETS:
        raise ConfigError(f"model.preset: {model.preset!r} is not one of {sorted(PRESETS)}")
    sizes = {k: getattr(model, k) for k in ("hidden_size", "depth", "num_heads", "patch_size") if getattr(model, k) is not None}
    return {**PRESETS[model.preset], **sizes, "conditioning": model.conditioning,
            "prediction_type": model.prediction_type, "use_qk_norm": model.use_qk_norm, **block_design(model)}
