"""Component loaders, offline: tiny random VAEs and text encoders (CLIP, BERT-like, T5) saved to folders and
loaded the way a user's code does, the real TAESD and CLIP tokenizer from the shared folder, and load_pipeline."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from transformers import (
    BertConfig,
    BertModel,
    BertTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTextModel,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5ForConditionalGeneration,
)

from latent_dit.components import (
    build_pipeline,
    load_pipeline,
    load_text_encoder,
    load_vae,
    text_embed_dim,
    vae_latent_channels,
    vae_scale_factor,
)
from latent_dit.pipelines import LatentDiTPipeline
from latent_dit.tiny import make_tiny_text_encoder, make_tiny_tokenizer, make_tiny_transformer, make_tiny_vae

PROMPT = "a red fox"


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module):
    a_state, b_state = a.state_dict(), b.state_dict()
    assert a_state.keys() == b_state.keys()
    for name in a_state:
        assert torch.equal(a_state[name], b_state[name]), name


def _frozen(module: torch.nn.Module) -> bool:
    return not module.training and not any(p.requires_grad for p in module.parameters())


def _generate(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    kwargs = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(0), **kwargs}
    return pipe(PROMPT, **kwargs).images


def _psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of images in [-1, 1] (peak-to-peak 2)."""
    mse = ((a.clamp(-1, 1) - b.clamp(-1, 1)) / 2).pow(2).mean()
    return float(10 * torch.log10(1 / mse))


# --- VAEs ------------------------------------------------------------------------------------------------------


def test_load_vae_picks_the_class_from_the_config(tmp_path, make_tiny_autoencoder_tiny):
    for name, vae in (("kl", make_tiny_vae()), ("tiny", make_tiny_autoencoder_tiny())):
        vae.save_pretrained(tmp_path / name)
        loaded = load_vae(str(tmp_path / name))
        assert type(loaded) is type(vae)
        assert _frozen(loaded)
        _assert_same_weights(loaded, vae)
        assert vae_latent_channels(loaded) == 4 and vae_scale_factor(loaded) == 2
    assert load_vae(None) is None and vae_latent_channels(None) == 3 and vae_scale_factor(None) == 1


def test_load_vae_from_a_pipeline_subfolder(tmp_path):
    make_tiny_vae().save_pretrained(tmp_path / "vae")
    assert isinstance(load_vae(str(tmp_path), subfolder="vae"), AutoencoderKL)


def test_load_vae_rejects_other_classes(tmp_path):
    make_tiny_vae().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "VQModel"}))
    with pytest.raises(ValueError, match=r"VAE class 'VQModel' is not supported; use one of \['AutoencoderKL', 'AutoencoderTiny'\]"):
        load_vae(str(tmp_path))


def test_load_vae_dtype(tmp_path):
    make_tiny_vae().save_pretrained(tmp_path)
    assert load_vae(str(tmp_path), dtype=torch.bfloat16).dtype == torch.bfloat16


# --- text encoders ------------------------------------------------------------------------------------------------


def _save_clip(path):
    tokenizer = make_tiny_tokenizer(path)
    make_tiny_text_encoder(len(tokenizer), hidden_size=32).save_pretrained(path)


def _save_bert(path):
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "fox", "cat", "dog", "blurry", "photo", "of", "##es"]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=24, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=48, max_position_embeddings=128)
    BertModel(config).save_pretrained(path)


def _save_t5(path, model_class=T5EncoderModel):
    # sentencepiece is not installed, so T5's own tokenizer cannot be built: the tiny CLIP tokenizer stands in,
    # saved in the same folder (AutoTokenizer follows tokenizer_config.json, the model class follows config.json).
    tokenizer = make_tiny_tokenizer(path)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tokenizer), d_model=16, d_kv=8, d_ff=32, num_layers=2, num_decoder_layers=1,
                      num_heads=2, decoder_start_token_id=0)
    model_class(config).save_pretrained(path)


ENCODERS = {
    # name: (writer, expected model class, expected tokenizer class, token width)
    "clip": (_save_clip, CLIPTextModel, CLIPTokenizer, 32),
    "bert": (_save_bert, BertModel, BertTokenizer, 24),
    "t5": (_save_t5, T5EncoderModel, CLIPTokenizer, 16),
}


@pytest.mark.parametrize("name", sorted(ENCODERS))
def test_load_text_encoder_and_generate(name, tmp_path):
    writer, model_class, tokenizer_class, width = ENCODERS[name]
    writer(tmp_path / "encoder")
    tokenizer, text_encoder = load_text_encoder(str(tmp_path / "encoder"))
    assert type(text_encoder) is model_class and isinstance(tokenizer, tokenizer_class)
    assert _frozen(text_encoder)
    assert text_embed_dim(text_encoder) == width

    make_tiny_vae().save_pretrained(tmp_path / "vae")
    transformer = make_tiny_transformer(text_embed_dim=text_embed_dim(text_encoder))
    pipe = build_pipeline(transformer, vae=load_vae(str(tmp_path / "vae")), tokenizer=tokenizer, text_encoder=text_encoder)
    embeds, mask, pooled, *_ = pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False, max_sequence_length=16)
    length = int(mask.sum())  # the prompt's tokens: padding no prompt uses is dropped
    assert 1 < length <= 16 and embeds.shape == (1, length, width) and mask.all() and pooled.shape == (1, width)
    if name == "clip":  # CLIP: the end-of-text state
        torch.testing.assert_close(pooled[0], embeds[0, int(mask.sum()) - 1])
    else:  # T5 / BERT-like: the mean over real tokens
        torch.testing.assert_close(pooled[0], embeds[0, mask[0].bool()].mean(0))

    images = _generate(pipe, guidance_scale=3.0)
    assert images.shape == (1, 16, 16, 3) and np.isfinite(images).all()
    assert np.abs(images - _generate(pipe, guidance_scale=1.0)).max() > 1e-4  # the prompt is really used

    # The whole pipeline survives save -> load_pipeline with this encoder.
    pipe.save_pretrained(tmp_path / "pipeline")
    loaded = load_pipeline(str(tmp_path / "pipeline"))
    assert type(loaded.text_encoder) is model_class
    np.testing.assert_array_equal(_generate(loaded, guidance_scale=3.0), images)


def test_full_t5_checkpoint_loads_only_the_encoder(tmp_path):
    _save_t5(tmp_path, model_class=T5ForConditionalGeneration)
    _, text_encoder = load_text_encoder(str(tmp_path))
    assert type(text_encoder) is T5EncoderModel  # AutoModel would build T5Model, which needs decoder inputs
    full = T5ForConditionalGeneration.from_pretrained(tmp_path)
    _assert_same_weights(text_encoder.encoder, full.encoder)


def test_full_clip_checkpoint_loads_only_the_text_tower(tmp_path):
    tokenizer = make_tiny_tokenizer(tmp_path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                           image_size=32, patch_size=16),
        projection_dim=16,
    )
    full = CLIPModel(config)
    full.save_pretrained(tmp_path)
    _, text_encoder = load_text_encoder(str(tmp_path))
    assert type(text_encoder) is CLIPTextModel and text_embed_dim(text_encoder) == 32
    # transformers 5 dropped CLIPTextModel's `text_model` wrapper; 4.x still has it.
    _assert_same_weights(getattr(text_encoder, "text_model", text_encoder), full.text_model)


def test_load_text_encoder_from_subfolders(tmp_path):
    _save_clip(tmp_path / "text_encoder")
    make_tiny_tokenizer(tmp_path / "tokenizer")
    tokenizer, text_encoder = load_text_encoder(str(tmp_path), subfolder="text_encoder", tokenizer_subfolder="tokenizer")
    assert isinstance(text_encoder, CLIPTextModel) and isinstance(tokenizer, CLIPTokenizer)


# --- load_pipeline -----------------------------------------------------------------------------------------------


def test_load_pipeline_round_trip_and_dtype(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir))
    assert isinstance(pipe, LatentDiTPipeline) and pipe.transformer.dtype == torch.float32
    assert load_pipeline(str(tiny_pipeline_dir), dtype=torch.bfloat16).transformer.dtype == torch.bfloat16


def test_load_pipeline_missing_path_names_it(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match=rf"{missing}.* does not exist"):
        load_pipeline(str(missing))
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.* has no model_index.json"):
        load_pipeline(str(tmp_path))
    for relative in ("./no-such-model", "runs/no-such-run/export"):
        with pytest.raises(FileNotFoundError, match=rf"'{relative}' does not exist"):
            load_pipeline(relative)


def test_load_pipeline_sends_user_slash_name_to_the_hub():
    # "user/name" is a Hub id, not a missing local folder: offline, the Hub loader itself fails.
    with pytest.raises(OSError) as excinfo:
        load_pipeline("no-such-user-xyz/no-such-model")
    assert "no-such-user-xyz/no-such-model" in str(excinfo.value)
    assert "Model path" not in str(excinfo.value)  # not the missing-local-folder error


# --- the real TAESD and CLIP tokenizer (shared folder) ----------------------------------------------------------------

EMOJI = "0023-fe0f-20e3.png"  # "a 3d rendered hash key emoji"


def _emoji_batch(shared_dir, names, size=128) -> torch.Tensor:
    """Emoji as (N, 3, size, size) in [-1, 1]."""
    folder = shared_dir / "data" / "emoji_fluent3d_256"
    if not folder.is_dir():
        pytest.skip(f"emoji data not found at {folder}")
    images = [PIL.Image.open(folder / name).convert("RGB").resize((size, size), PIL.Image.BICUBIC) for name in names]
    return torch.from_numpy(np.stack([np.asarray(image) for image in images])).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.fixture(scope="module")
def taesd(shared_dir):
    path = shared_dir / "assets" / "taesd"
    if not path.is_dir():
        pytest.skip(f"TAESD not found at {path}")
    return load_vae(str(path))


def test_taesd_reconstructs_a_real_emoji(taesd, shared_dir):
    assert isinstance(taesd, AutoencoderTiny) and _frozen(taesd)
    assert vae_scale_factor(taesd) == 8 and vae_latent_channels(taesd) == 4
    image = _emoji_batch(shared_dir, [EMOJI])
    with torch.no_grad():
        latents = taesd.encode(image).latents
        reconstruction = taesd.decode(latents).sample
    assert latents.shape == (1, 4, 16, 16)
    # Measured 31.3 dB (README: ~31.5 dB for 128-px emoji); a broken encoder or [0,1]/[-1,1] mix-up gives < 20.
    assert _psnr(reconstruction, image) >= 28.0
    # The pipeline's decode path (scaling and shift undone) reconstructs it just as well.
    pipe = build_pipeline(make_tiny_transformer(conditioning="none"), vae=taesd)
    assert pipe.vae_scale_factor == 8
    with torch.no_grad():
        decoded = pipe.decode_latents(latents * taesd.config.scaling_factor)
    torch.testing.assert_close(decoded, reconstruction)


def test_taesd_reconstructs_a_spread_of_emoji(taesd, shared_dir):
    lines = (shared_dir / "data" / "emoji_fluent3d_256" / "metadata.jsonl").read_text().splitlines()
    names = [json.loads(line)["file_name"] for line in lines[:: len(lines) // 8][:8]]
    images = _emoji_batch(shared_dir, names)
    with torch.no_grad():
        reconstructions = taesd.decode(taesd.encode(images).latents).sample
    psnrs = [_psnr(r, i) for r, i in zip(reconstructions, images)]
    # Measured mean 29.2 dB over these eight (26.2 to 33.3): detailed emoji reconstruct worse than the README's figure.
    assert np.mean(psnrs) >= 27.5, psnrs


def test_pipeline_with_taesd_and_the_real_clip_tokenizer(taesd, shared_dir):
    path = shared_dir / "assets" / "clip_tokenizer"
    if not path.is_dir():
        pytest.skip(f"CLIP tokenizer not found at {path}")
    tokenizer = CLIPTokenizer.from_pretrained(path)
    # The reference CLIP ids: <|startoftext|> a photo of a cat <|endoftext|>.
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(tokenizer) == 49408

    text_encoder = make_tiny_text_encoder(vocab_size=len(tokenizer))
    pipe = build_pipeline(make_tiny_transformer(text_embed_dim=text_embed_dim(text_encoder)), vae=taesd,
                          tokenizer=tokenizer, text_encoder=text_encoder)
    images = _generate(pipe, guidance_scale=3.0)
    assert images.shape == (1, 64, 64, 3) and np.isfinite(images).all()  # 8×8 latents × TAESD's factor 8
    pil = _generate(pipe, output_type="pil", height=128, width=128)
    assert pil[0].size == (128, 128)
