"""Tiny random-weight components built from configs: try the pipeline with no downloads, and test it.

`make_tiny_pipeline()` gives a complete `LatentDiTPipeline` (a small `AutoencoderKL`, a two-layer CLIP
text encoder with a byte-level tokenizer written on the spot, and a depth-2 DiT). Its images are noise:
it shows the machinery, not a trained model.
"""

import json
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from .model import LatentDiTTransformer2DModel


def _byte_symbols() -> list[str]:
    # GPT-2/CLIP's reversible byte -> printable-unicode table, so every string is encodable.
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    extra = [b for b in range(256) if b not in keep]
    return [chr(b) for b in keep] + [chr(256 + i) for i in range(len(extra))]


def make_tiny_tokenizer(save_dir: str | Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer (no merges, 514 tokens) written to `save_dir` and loaded back."""
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {token: i for i, token in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    (save_dir / "vocab.json").write_text(json.dumps(vocab))
    (save_dir / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(save_dir / "vocab.json"), str(save_dir / "merges.txt"), model_max_length=77)
    tokenizer.save_pretrained(save_dir)
    return CLIPTokenizer.from_pretrained(save_dir)


def make_tiny_text_encoder(vocab_size: int = 514, hidden_size: int = 32, seed: int = 0) -> CLIPTextModel:
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    return CLIPTextModel(config).eval()


def make_tiny_vae(seed: int = 0) -> AutoencoderKL:
    """A 2-level AutoencoderKL (downsamples ×2, 4 latent channels)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32), layers_per_block=1,
        latent_channels=4, norm_num_groups=8, sample_size=32,
    ).eval()


def make_tiny_transformer(seed: int = 0, **overrides) -> LatentDiTTransformer2DModel:
    torch.manual_seed(seed)
    config = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, text_embed_dim=32)
    model = LatentDiTTransformer2DModel(**{**config, **overrides})
    # adaLN-Zero makes a fresh model output exactly 0; perturb every weight so the tiny model draws something.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def make_tiny_pipeline(save_dir: str | Path | None = None, seed: int = 0, use_vae: bool = True, **transformer_overrides):
    """A random-weight text-to-image pipeline; saved to `save_dir` (and loaded back from it) when given."""
    from .components import build_pipeline

    tokenizer_dir = tempfile.mkdtemp(prefix="latent-dit-tokenizer-")
    tokenizer = make_tiny_tokenizer(tokenizer_dir)
    vae = make_tiny_vae(seed) if use_vae else None
    overrides = {"in_channels": 4 if use_vae else 3, **transformer_overrides}
    pipe = build_pipeline(make_tiny_transformer(seed, **overrides), vae=vae, tokenizer=tokenizer,
                          text_encoder=make_tiny_text_encoder(len(tokenizer), seed=seed))
    if save_dir is None:
        return pipe
    pipe.save_pretrained(save_dir)
    from .pipelines import LatentDiTPipeline

    return LatentDiTPipeline.from_pretrained(save_dir)
