"""LatentDiTPipeline with tiny random components: save/load, guidance, sizes, output types, batching,
latents, prompt embeddings, callbacks, schedulers, input checks, conditioning modes, offload and VAEs."""

import io

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)

import latent_dit  # noqa: F401  (registers the pipeline with diffusers)
from latent_dit.components import build_pipeline
from latent_dit.pipelines import LatentDiTPipeline
from latent_dit.tiny import make_tiny_pipeline, make_tiny_transformer, make_tiny_vae

PROMPT = "a red fox"
SIZE = 16  # the tiny pipeline's default: sample_size 8 × VAE factor 2


def generate(pipe, prompt=PROMPT, seed=0, **kwargs):
    kwargs = {"num_inference_steps": 2, "output_type": "np", "generator": torch.Generator().manual_seed(seed), **kwargs}
    return pipe(prompt, **kwargs).images


class CallRecorder:
    """Records the batch size and timesteps of every transformer call."""

    def __init__(self, transformer):
        self.batches, self.timesteps = [], []
        transformer.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        hidden_states, timestep = args[:2]
        self.batches.append(hidden_states.shape[0])
        self.timesteps.append(timestep.clone())


def quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --- saving and loading --------------------------------------------------------------------------------------


def test_save_and_load_gives_identical_images(tiny_pipe, tmp_path):
    expected = generate(tiny_pipe)
    tiny_pipe.save_pretrained(tmp_path)
    for name in ("model_index.json", "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors",
                 "vae/config.json", "text_encoder/config.json", "tokenizer/tokenizer_config.json", "scheduler/scheduler_config.json"):
        assert (tmp_path / name).is_file(), name
    loaded = quiet(LatentDiTPipeline.from_pretrained(tmp_path))
    assert type(loaded.scheduler) is type(tiny_pipe.scheduler)
    np.testing.assert_array_equal(generate(loaded), expected)


def test_generic_diffusion_pipeline_loader_returns_latent_dit_pipeline(tiny_pipeline_dir):
    pipe = quiet(DiffusionPipeline.from_pretrained(tiny_pipeline_dir))
    assert isinstance(pipe, LatentDiTPipeline)
    assert type(pipe.transformer).__name__ == "LatentDiTTransformer2DModel"
    reference = quiet(LatentDiTPipeline.from_pretrained(tiny_pipeline_dir))
    np.testing.assert_array_equal(generate(pipe), generate(reference))


def test_same_seed_same_image_other_seed_other_image(tiny_pipe):
    a, b, c = generate(tiny_pipe, seed=1), generate(tiny_pipe, seed=1), generate(tiny_pipe, seed=2)
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


# --- classifier-free guidance -----------------------------------------------------------------------------------


def test_guidance_one_is_the_conditional_prediction(tiny_pipe):
    calls = CallRecorder(tiny_pipe.transformer)
    unguided = generate(tiny_pipe, guidance_scale=1.0)
    assert calls.batches == [1, 1]  # guidance disabled: one unbatched model pass per step

    # With the negative embeddings equal to the prompt's, uncond == cond, so any guidance scale gives cond.
    embeds, mask, *_ = tiny_pipe.encode_prompt(PROMPT, do_classifier_free_guidance=False)
    same_negative = tiny_pipe(
        prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=embeds,
        negative_prompt_attention_mask=mask, guidance_scale=3.0, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert calls.batches[2:] == [2, 2]  # guided: [uncond; cond] in one batch
    np.testing.assert_allclose(same_negative, unguided, atol=1e-5)

    guided = generate(tiny_pipe, guidance_scale=3.0)
    assert np.abs(guided - unguided).max() > 1e-3


def test_guidance_interval_guides_only_the_steps_whose_noise_level_is_inside(tiny_pipe):
    calls = CallRecorder(tiny_pipe.transformer)
    full = generate(tiny_pipe, guidance_scale=3.0, num_inference_steps=4)
    assert generate(tiny_pipe, guidance_scale=3.0, num_inference_steps=4, guidance_interval=(0.0, 1.0)).tolist() == full.tolist()
    calls.batches.clear(), calls.timesteps.clear()
    partial = generate(tiny_pipe, guidance_scale=3.0, num_inference_steps=4, guidance_interval=(0.3, 0.8))
    levels = [t[0].item() / tiny_pipe.scheduler.config.num_train_timesteps for t in calls.timesteps]
    assert calls.batches == [2 if 0.3 <= level <= 0.8 else 1 for level in levels]
    assert 1 in calls.batches and 2 in calls.batches, levels  # the interval splits this schedule
    assert np.abs(partial - full).max() > 1e-4
    # An interval that holds no step is no guidance at all.
    unguided = generate(tiny_pipe, guidance_scale=1.0, num_inference_steps=4)
    np.testing.assert_allclose(generate(tiny_pipe, guidance_scale=3.0, num_inference_steps=4, guidance_interval=(0.0, 1e-6)),
                               unguided, atol=1e-6)
    for bad in ((0.5, 0.5), (-0.1, 0.5), (0.2, 1.5), (0.1,)):
        with pytest.raises(ValueError, match="guidance_interval"):
            generate(tiny_pipe, guidance_scale=3.0, guidance_interval=bad)


def test_default_guidance_is_the_pipelines_own_and_is_saved_with_it(tmp_path):
    parts = make_tiny_pipeline()
    pipe = quiet(build_pipeline(parts.transformer, vae=parts.vae, tokenizer=parts.tokenizer, text_encoder=parts.text_encoder,
                                guidance_scale=2.0))
    pipe.save_pretrained(tmp_path)
    loaded = quiet(LatentDiTPipeline.from_pretrained(tmp_path))
    assert loaded.config.default_guidance_scale == 2.0
    unset = generate(loaded)
    np.testing.assert_array_equal(unset, generate(loaded, guidance_scale=2.0))
    assert np.abs(unset - generate(loaded, guidance_scale=4.5)).max() > 1e-4
    assert parts.config.default_guidance_scale == 4.5  # PixArt-α's, when a model names none


def test_negative_prompt_changes_the_guided_image(tiny_pipe):
    default = generate(tiny_pipe, guidance_scale=3.0)
    explicit_empty = generate(tiny_pipe, guidance_scale=3.0, negative_prompt="")
    other = generate(tiny_pipe, guidance_scale=3.0, negative_prompt="blurry")
    np.testing.assert_array_equal(explicit_empty, default)
    assert np.abs(other - default).max() > 1e-3


# --- sizes, output types, batching ----------------------------------------------------------------------------


@pytest.mark.parametrize("height, width", [(None, None), (2 * SIZE, 2 * SIZE), (SIZE, 2 * SIZE), (28, 12)])
def test_sizes(tiny_pipe, height, width):
    images = generate(tiny_pipe, height=height, width=width)
    assert images.shape == (1, height or SIZE, width or SIZE, 3)
    assert np.isfinite(images).all()


def test_output_types(tiny_pipe):
    height, width = SIZE, 2 * SIZE
    outputs = {kind: generate(tiny_pipe, height=height, width=width, output_type=kind) for kind in ("pil", "np", "pt", "latent")}

    assert isinstance(outputs["pil"], list) and len(outputs["pil"]) == 1
    assert isinstance(outputs["pil"][0], PIL.Image.Image) and outputs["pil"][0].size == (width, height)
    assert outputs["pil"][0].mode == "RGB"
    assert isinstance(outputs["np"], np.ndarray) and outputs["np"].shape == (1, height, width, 3)
    assert outputs["np"].min() >= 0 and outputs["np"].max() <= 1
    assert isinstance(outputs["pt"], torch.Tensor) and outputs["pt"].shape == (1, 3, height, width)
    assert isinstance(outputs["latent"], torch.Tensor) and outputs["latent"].shape == (1, 4, height // 2, width // 2)

    # All four are the same image.
    np.testing.assert_allclose(outputs["pt"].permute(0, 2, 3, 1).numpy(), outputs["np"], atol=1e-6)
    np.testing.assert_array_equal(np.asarray(outputs["pil"][0]), (outputs["np"][0] * 255).round().astype(np.uint8))
    with torch.no_grad():
        decoded = tiny_pipe.image_processor.postprocess(tiny_pipe.decode_latents(outputs["latent"]), output_type="np")
    np.testing.assert_allclose(decoded, outputs["np"], atol=1e-6)


def test_return_dict_false_returns_a_tuple(tiny_pipe):
    (images,) = tiny_pipe(PROMPT, num_inference_steps=2, output_type="np", return_dict=False,
                          generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(images, generate(tiny_pipe))


def test_prompt_list_and_images_per_prompt_make_the_batch(tiny_pipe):
    calls = CallRecorder(tiny_pipe.transformer)
    images = generate(tiny_pipe, prompt=["a cat", "a dog"], num_images_per_prompt=3, guidance_scale=1.0)
    assert images.shape == (6, SIZE, SIZE, 3)
    assert calls.batches == [6, 6]
    for i in range(1, 6):  # every image has its own noise
        assert np.abs(images[i] - images[0]).max() > 1e-3


def test_batched_prompts_match_single_prompts(tiny_pipe):
    generators = [torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)]
    batch = tiny_pipe(["a cat", "a dog"], generator=generators, num_inference_steps=2, output_type="np").images
    cat = generate(tiny_pipe, "a cat", seed=1)
    dog = generate(tiny_pipe, "a dog", seed=2)
    np.testing.assert_allclose(batch[0], cat[0], atol=1e-5)
    np.testing.assert_allclose(batch[1], dog[0], atol=1e-5)


def test_latents_argument_is_used(tiny_pipe):
    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(5))
    a = generate(tiny_pipe, latents=latents, seed=0)
    b = generate(tiny_pipe, latents=latents.clone(), seed=123)  # the generator no longer draws the start noise
    c = generate(tiny_pipe, latents=torch.randn_like(latents))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    with pytest.raises(ValueError, match=r"latents have shape \(1, 4, 4, 4\)"):
        generate(tiny_pipe, latents=torch.randn(1, 4, 4, 4))


# --- prompt embeddings -----------------------------------------------------------------------------------------


def test_prompt_embeds_path_equals_prompt_path(tiny_pipe):
    expected = generate(tiny_pipe, guidance_scale=3.0, negative_prompt="blurry")
    embeds, mask, pooled, negative, negative_mask, negative_pooled = tiny_pipe.encode_prompt(PROMPT, negative_prompt="blurry")
    length = int(torch.cat([mask, negative_mask]).sum(1).max())  # the longer of the two prompts, not 77
    assert embeds.shape == (1, length, 32) and mask.shape == (1, length) and pooled.shape == (1, 32)
    assert negative.shape == embeds.shape
    images = tiny_pipe(
        prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask, guidance_scale=3.0, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    np.testing.assert_array_equal(images, expected)

    # Only prompt_embeds: the negative side is the encoded empty prompt, as with text.
    images = tiny_pipe(prompt_embeds=embeds, prompt_attention_mask=mask, guidance_scale=3.0, num_inference_steps=2,
                       output_type="np", generator=torch.Generator().manual_seed(0)).images
    # (equal up to float rounding: the two paths pad the empty negative prompt to different lengths)
    np.testing.assert_allclose(images, generate(tiny_pipe, guidance_scale=3.0), atol=1e-6)


def test_precomputed_embeddings_without_a_text_encoder(tiny_pipe):
    # E.g. embeddings from a latent cache: the pipeline needs no tokenizer/text encoder when given both sides.
    embeds, mask, pooled, negative, negative_mask, negative_pooled = tiny_pipe.encode_prompt(PROMPT)
    expected = generate(tiny_pipe, guidance_scale=3.0)
    pipe = quiet(build_pipeline(tiny_pipe.transformer, vae=tiny_pipe.vae, scheduler=tiny_pipe.scheduler))
    given = dict(prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
                 negative_prompt_attention_mask=negative_mask, guidance_scale=3.0, num_inference_steps=2, output_type="np")
    images = pipe(**given, pooled_prompt_embeds=pooled, negative_pooled_prompt_embeds=negative_pooled,
                  generator=torch.Generator().manual_seed(0)).images
    np.testing.assert_array_equal(images, expected)
    # Without the encoder the pipeline cannot know CLIP pools the end-of-text state: it takes the masked mean.
    mean_pooled = pipe(**given, generator=torch.Generator().manual_seed(0)).images
    assert np.abs(mean_pooled - expected).max() > 1e-4
    with pytest.raises(ValueError, match="no tokenizer/text_encoder: pass prompt_embeds"):
        pipe(prompt_embeds=embeds, guidance_scale=3.0, num_inference_steps=1)  # the negative side needs the encoder


def test_padding_length_does_not_change_the_image(tiny_pipe):
    # Padding is masked out of cross-attention and pooling, so the padded length is irrelevant.
    np.testing.assert_allclose(generate(tiny_pipe, max_sequence_length=20), generate(tiny_pipe), atol=1e-5)


def test_padding_no_prompt_uses_never_reaches_the_transformer(tiny_pipe):
    from latent_dit.pipelines.pipeline_latent_dit import encode_text, pool_prompt_embeds, trim_padding

    lengths = []
    hook = tiny_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: lengths.append(kwargs["encoder_hidden_states"].shape[1]), with_kwargs=True)
    generate(tiny_pipe, prompt=[PROMPT, "ab"], guidance_scale=3.0, negative_prompt="a much longer negative prompt")
    hook.remove()
    longest = max(len(tiny_pipe.tokenizer(text).input_ids) for text in (PROMPT, "ab", "a much longer negative prompt"))
    assert lengths == [longest] * 2  # 2 steps, each over the longest of the four prompts, not max_sequence_length=77

    # Exact: the transformer's prediction is the same with the padding as without it.
    padded, padded_mask = encode_text(tiny_pipe.tokenizer, tiny_pipe.text_encoder, [PROMPT, "ab"], "cpu", 77)
    [(trimmed, trimmed_mask)] = trim_padding((padded, padded_mask))
    assert trimmed.shape[1] == trimmed_mask.shape[1] == int(padded_mask.sum(1).max()) < 77
    pooled = pool_prompt_embeds(padded, padded_mask, tiny_pipe.text_encoder)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10.0, 700.0])
    with torch.no_grad():
        full = tiny_pipe.transformer(x, t, padded, padded_mask, pooled).sample
        short = tiny_pipe.transformer(x, t, trimmed, trimmed_mask, pooled).sample
    torch.testing.assert_close(short, full)


def test_clip_pooling_takes_the_end_of_text_state(tiny_pipe):
    embeds, mask, pooled, *_ = tiny_pipe.encode_prompt(["ab", "abcd"], do_classifier_free_guidance=False)
    lengths = mask.sum(1)
    assert lengths.tolist() == [4, 6]  # start + characters + end-of-text (byte-level tokenizer)
    torch.testing.assert_close(pooled[0], embeds[0, 3])
    torch.testing.assert_close(pooled[1], embeds[1, 5])


# --- callbacks and progress bar ---------------------------------------------------------------------------------


def test_callback_on_step_end_is_called_each_step_and_can_change_latents(tiny_pipe):
    seen = []

    def callback(pipe, step, timestep, callback_kwargs):
        seen.append((step, float(timestep), callback_kwargs["latents"].shape))
        if step == pipe.num_timesteps - 1:
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return {}

    latents = generate(tiny_pipe, num_inference_steps=3, output_type="latent", callback_on_step_end=callback)
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert [t for _, t, _ in seen] == tiny_pipe.scheduler.timesteps.tolist()
    assert all(shape == (1, 4, SIZE // 2, SIZE // 2) for *_, shape in seen)
    assert torch.count_nonzero(latents) == 0


def test_callback_can_read_prompt_embeds(tiny_pipe):
    seen = {}

    def callback(pipe, step, timestep, callback_kwargs):
        seen.update(callback_kwargs)
        return {}

    generate(tiny_pipe, guidance_scale=2.0, callback_on_step_end=callback,
             callback_on_step_end_tensor_inputs=["latents", "prompt_embeds", "negative_prompt_embeds"])
    length = len(tiny_pipe.tokenizer(PROMPT).input_ids)  # unused padding is dropped (the empty negative is shorter)
    assert seen["prompt_embeds"].shape == seen["negative_prompt_embeds"].shape == (1, length, 32)


def test_callback_can_change_prompt_embeds_for_the_next_steps(tiny_pipe):
    """Guidance inputs are stacked once before the loop; a callback that returns new prompt embeddings must
    still reach the transformer from the next step on (here: the negative prompt's, so cond == uncond)."""
    texts = []
    tiny_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: texts.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True)

    def callback(pipe, step, timestep, callback_kwargs):
        return {"prompt_embeds": callback_kwargs["negative_prompt_embeds"]} if step == 0 else {}

    generate(tiny_pipe, num_inference_steps=3, guidance_scale=2.0, callback_on_step_end=callback,
             callback_on_step_end_tensor_inputs=["negative_prompt_embeds"])
    negative, positive = texts[0].chunk(2)
    assert not torch.equal(negative, positive)
    for later in texts[1:]:
        torch.testing.assert_close(later, torch.cat([negative, negative]))


def test_progress_bar_is_shown_and_configurable(tiny_pipe):
    stream = io.StringIO()
    tiny_pipe.set_progress_bar_config(file=stream, disable=False, desc="denoising")
    generate(tiny_pipe, num_inference_steps=3)
    assert "denoising" in stream.getvalue() and "3/3" in stream.getvalue()

    stream = io.StringIO()
    tiny_pipe.set_progress_bar_config(file=stream, disable=True)
    generate(tiny_pipe, num_inference_steps=3)
    assert stream.getvalue() == ""


# --- schedulers ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, DDPMScheduler])
def test_swapped_schedulers_run(tiny_pipe, scheduler_class):
    tiny_pipe.scheduler = scheduler_class.from_config(tiny_pipe.scheduler.config)
    calls = CallRecorder(tiny_pipe.transformer)
    images = generate(tiny_pipe, num_inference_steps=3)
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    assert calls.batches == [2, 2, 2]
    np.testing.assert_array_equal(generate(tiny_pipe, num_inference_steps=3), images)  # seeded, even for DDPM


def test_flow_model_runs_with_flow_match_euler():
    pipe = quiet(make_tiny_pipeline(prediction_type="flow"))
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    calls = CallRecorder(pipe.transformer)
    images = generate(pipe, num_inference_steps=4)
    assert images.shape == (1, SIZE, SIZE, 3) and np.isfinite(images).all()
    # The model sees σ·1000, from pure noise (σ=1, t=1000) down to the schedule's σ_min=0.001.
    timesteps = torch.stack([t[0] for t in calls.timesteps])
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 667.0, 334.0, 1.0]))


def test_flow_sampling_integrates_the_velocity():
    # A flow "model" that always predicts velocity v moves the latents by exactly -v over σ: 1 -> 0.
    pipe = quiet(make_tiny_pipeline(prediction_type="flow"))
    velocity = 0.25

    def constant_velocity(module, args, kwargs, output):
        return (torch.full_like(output[0], velocity),)

    pipe.transformer.register_forward_hook(constant_velocity, with_kwargs=True)
    start = torch.randn(1, 4, SIZE // 2, SIZE // 2, generator=torch.Generator().manual_seed(0))
    final = pipe(PROMPT, latents=start, num_inference_steps=4, output_type="latent").images
    torch.testing.assert_close(final, start - velocity)


@pytest.mark.parametrize(
    "prediction_type, scheduler, message",
    [
        ("flow", DDIMScheduler(), r"predicts 'epsilon' but the transformer was trained for 'flow'.*FlowMatchEulerDiscreteScheduler"),
        ("epsilon", FlowMatchEulerDiscreteScheduler(), r"predicts 'flow' but the transformer was trained for 'epsilon'"),
        ("epsilon", DDIMScheduler(prediction_type="v_prediction"), r"'v_prediction' but .* 'epsilon'.*prediction_type='epsilon'"),
    ],
)
def test_scheduler_and_model_prediction_mismatch_raises(prediction_type, scheduler, message):
    pipe = quiet(make_tiny_pipeline(prediction_type=prediction_type))
    pipe.scheduler = scheduler
    with pytest.raises(ValueError, match=message):
        generate(pipe)


# --- input checks ---------------------------------------------------------------------------------------------


def _embeds(batch=1, length=77, dim=32):
    return torch.randn(batch, length, dim)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 18}, r"multiples of 4 .*18×16.*16×16 or 20×20"),
        ({"width": 30, "height": 16}, r"multiples of 4 .*16×30.*16×28 or 20×32"),
        ({"height": 0}, r"positive multiples of 4"),
        ({"prompt_embeds": _embeds()}, r"either `prompt` or `prompt_embeds`, not both"),
        ({"prompt": None}, r"Pass `prompt` .* or `prompt_embeds`"),
        ({"prompt": 3}, r"`prompt` must be a string or a list of strings, got int"),
        ({"negative_prompt": ["x", "y"]}, r"negative_prompt has 2 entries but there are 1 prompts"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x"]}, r"negative_prompt has 1 entries but there are 2 prompts"),
        ({"negative_prompt": "x", "negative_prompt_embeds": _embeds()}, r"either `negative_prompt` or `negative_prompt_embeds`"),
        ({"prompt": None, "prompt_embeds": _embeds(2), "negative_prompt_embeds": _embeds(1)},
         r"prompt_embeds \(2, 77, 32\) and negative_prompt_embeds \(1, 77, 32\) must have the same shape"),
        ({"prompt": None, "prompt_embeds": _embeds(1), "prompt_attention_mask": torch.ones(1, 10)},
         r"prompt_attention_mask \(1, 10\) must match prompt_embeds"),
        ({"generator": [torch.Generator().manual_seed(0)] * 3}, r"Got 3 generators for a batch of 1 images"),
        ({"prompt": ["a", "b"], "num_images_per_prompt": 2, "generator": [torch.Generator()] * 2},
         r"Got 2 generators for a batch of 4 images"),
        ({"output_type": "jpg"}, r"output_type='jpg' is not supported; choose one of \('pil', 'np', 'pt', 'latent'\)"),
        ({"class_labels": [1]}, r"class_labels are for class-conditional models"),
        ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, r"\['noise_pred'\] must be a subset of"),
    ],
)
def test_bad_inputs_raise_value_error_naming_the_problem(tiny_pipe, kwargs, message):
    kwargs = {"prompt": PROMPT, "output_type": "np", **kwargs}
    with pytest.raises(ValueError, match=message):
        tiny_pipe(**kwargs, num_inference_steps=1)


# --- other conditioning modes -------------------------------------------------------------------------------------


def test_class_conditional_pipeline():
    pipe = quiet(build_pipeline(make_tiny_transformer(conditioning="class", num_classes=10), vae=make_tiny_vae()))
    assert pipe.text_encoder is None and pipe.tokenizer is None
    calls = CallRecorder(pipe.transformer)
    images = generate(pipe, prompt=None, class_labels=[1, 2], num_images_per_prompt=2, guidance_scale=4.0)
    assert images.shape == (4, SIZE, SIZE, 3) and calls.batches == [8, 8]

    latents = torch.randn(1, 4, SIZE // 2, SIZE // 2)
    one = generate(pipe, prompt=None, class_labels=1, latents=latents)
    two = generate(pipe, prompt=None, class_labels=2, latents=latents)
    unguided = generate(pipe, prompt=None, class_labels=1, latents=latents, guidance_scale=1.0)
    assert np.abs(one - two).max() > 1e-4 and np.abs(one - unguided).max() > 1e-4

    with pytest.raises(ValueError, match="pass class_labels"):
        generate(pipe, prompt=None)
    with pytest.raises(ValueError, match=r"class_labels must lie in \[0, 9\], got \[10\]"):
        generate(pipe, prompt=None, class_labels=10)
    with pytest.raises(ValueError, match="takes no prompt"):
        generate(pipe, prompt="a cat", class_labels=1)


def test_class_conditional_pipeline_save_and_load(tmp_path):
    pipe = quiet(build_pipeline(make_tiny_transformer(conditioning="class", num_classes=10), vae=make_tiny_vae()))
    pipe.save_pretrained(tmp_path)
    loaded = quiet(DiffusionPipeline.from_pretrained(tmp_path))
    assert loaded.text_encoder is None and loaded.tokenizer is None
    np.testing.assert_array_equal(generate(loaded, prompt=None, class_labels=3), generate(pipe, prompt=None, class_labels=3))


def test_unconditional_pipeline():
    pipe = quiet(build_pipeline(make_tiny_transformer(conditioning="none"), vae=make_tiny_vae()))
    calls = CallRecorder(pipe.transformer)
    images = generate(pipe, prompt=None, num_images_per_prompt=2, guidance_scale=5.0)
    assert images.shape == (2, SIZE, SIZE, 3)
    assert calls.batches == [2, 2]  # nothing to guide with: no doubled batch
    with pytest.raises(ValueError, match="takes no prompt"):
        generate(pipe, prompt="a cat")


def test_pixel_space_pipeline():
    pipe = quiet(make_tiny_pipeline(use_vae=False))
    assert pipe.vae is None and pipe.vae_scale_factor == 1 and pipe.transformer.config.in_channels == 3
    images = generate(pipe, output_type="pt")
    assert images.shape == (1, 3, 8, 8)
    latents = generate(pipe, output_type="latent")
    assert latents.shape == (1, 3, 8, 8)
    # Without a VAE the "latents" are the image in [-1, 1].
    torch.testing.assert_close(images, (latents / 2 + 0.5).clamp(0, 1))
    assert generate(pipe, height=10, width=6).shape == (1, 10, 6, 3)
    with pytest.raises(ValueError, match=r"multiples of 2 \(VAE factor 1 × patch size 2\)"):
        generate(pipe, height=9)


# --- offload ---------------------------------------------------------------------------------------------------


def test_model_cpu_offload_gives_the_same_image(tiny_pipe):
    expected = generate(tiny_pipe, guidance_scale=3.0)
    sequence = tiny_pipe.model_cpu_offload_seq.split("->")
    assert set(sequence) <= set(tiny_pipe.components) and "transformer" in sequence
    tiny_pipe.enable_model_cpu_offload(device="cpu")
    assert len(tiny_pipe._all_hooks) == 3  # text encoder, transformer, VAE
    np.testing.assert_array_equal(generate(tiny_pipe, guidance_scale=3.0), expected)


def test_compiled_blocks_give_the_same_image(tiny_pipe):
    """README's speed-up: `pipe.transformer.compile_repeated_blocks()` compiles each DiT block, and sampling through
    the compiled blocks draws the eager image (float32, up to rounding)."""
    expected = generate(tiny_pipe, guidance_scale=3.0)
    torch._dynamo.reset()
    tiny_pipe.transformer.compile_repeated_blocks()
    assert all(block._compiled_call_impl is not None for block in tiny_pipe.transformer.blocks)
    frames_before = torch._dynamo.utils.counters["frames"]["ok"]
    np.testing.assert_allclose(generate(tiny_pipe, guidance_scale=3.0), expected, atol=1e-4)
    assert torch._dynamo.utils.counters["frames"]["ok"] > frames_before, "nothing ran compiled"


# --- VAEs ------------------------------------------------------------------------------------------------------


def test_vae_scale_factor_matches_the_real_downsampling(make_tiny_autoencoder_tiny):
    image = torch.rand(1, 3, 16, 24) * 2 - 1
    for vae in (make_tiny_vae(), make_tiny_autoencoder_tiny()):
        pipe = build_pipeline(make_tiny_transformer(conditioning="none"), vae=vae)
        with torch.no_grad():
            encoded = vae.encode(image)
        latents = encoded.latents if hasattr(encoded, "latents") else encoded.latent_dist.mode()
        assert latents.shape[-2:] == (16 // pipe.vae_scale_factor, 24 // pipe.vae_scale_factor), type(vae).__name__


def test_autoencoder_tiny_pipeline(make_tiny_autoencoder_tiny):
    pipe = quiet(build_pipeline(make_tiny_transformer(), vae=make_tiny_autoencoder_tiny(),
                                tokenizer=make_tiny_pipeline().tokenizer, text_encoder=make_tiny_pipeline().text_encoder))
    images = generate(pipe, height=SIZE, width=2 * SIZE)
    assert images.shape == (1, SIZE, 2 * SIZE, 3) and np.isfinite(images).all()
    latents = generate(pipe, output_type="latent")
    with torch.no_grad():
        decoded = pipe.image_processor.postprocess(pipe.vae.decode(latents).sample, output_type="np")
    np.testing.assert_allclose(decoded, generate(pipe), atol=1e-6)


def test_decode_latents_undoes_scaling_and_shift(make_tiny_autoencoder_tiny):
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    # AutoencoderKL with an SD3/Flux-style shift: training stores (z - shift) * scale.
    vae = make_tiny_vae()
    vae.register_to_config(scaling_factor=0.5, shift_factor=0.3)
    pipe = build_pipeline(make_tiny_transformer(conditioning="none"), vae=vae)
    z = vae.encode(image).latent_dist.mode()
    torch.testing.assert_close(pipe.decode_latents((z - 0.3) * 0.5), vae.decode(z).sample)
    # The shift really matters for this decoder (so the check above could fail).
    assert (vae.decode(z - 0.3).sample - vae.decode(z).sample).abs().max() > 1e-3

    # AutoencoderTiny: TAESD's scaling_factor is 1.0, but a different one must still be honoured.
    tiny = make_tiny_autoencoder_tiny()
    tiny.register_to_config(scaling_factor=2.0)
    pipe = build_pipeline(make_tiny_transformer(conditioning="none"), vae=tiny)
    z = tiny.encode(image).latents
    torch.testing.assert_close(pipe.decode_latents(z * 2.0), tiny.decode(z).sample)
