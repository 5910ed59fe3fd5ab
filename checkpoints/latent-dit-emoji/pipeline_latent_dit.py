"""`LatentDiTPipeline`: prompt -> image with a latent DiT, shaped like diffusers' own pipelines.

This file imports only torch, transformers and diffusers, so it can also travel inside an exported
model folder and load with plain diffusers (`trust_remote_code=True`).
"""

import inspect
from typing import Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils.torch_utils import randn_tensor

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def pool_prompt_embeds(prompt_embeds: torch.Tensor, attention_mask: torch.Tensor, text_encoder=None) -> torch.Tensor:
    """One vector per prompt. CLIP's pooled output is the final state at the end-of-text token (its last
    real token); for other encoders (T5, BERT-like sentence encoders) the masked mean of the token states."""
    mask = attention_mask.to(prompt_embeds.dtype)
    model_type = getattr(getattr(text_encoder, "config", None), "model_type", "")
    if model_type.startswith("clip"):
        last = mask.sum(1).long().clamp(min=1) - 1
        return prompt_embeds[torch.arange(prompt_embeds.shape[0], device=prompt_embeds.device), last]
    return (prompt_embeds * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)


def encode_text(tokenizer, text_encoder, texts: list[str], device, max_sequence_length: int):
    """Tokenize (padded to max_sequence_length) and encode: (token states (N, L, D), attention mask (N, L))."""
    if tokenizer is None or text_encoder is None:
        raise ValueError("This pipeline has no tokenizer/text_encoder: pass prompt_embeds and prompt_attention_mask instead of text.")
    tokens = tokenizer(texts, padding="max_length", max_length=max_sequence_length, truncation=True, return_tensors="pt")
    input_ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    return text_encoder(input_ids, attention_mask=mask).last_hidden_state, mask


def trim_padding(*encodings):
    """Drop the trailing token columns that no prompt uses, from (embeds, mask) pairs padded to one length.

    Padding is masked out of cross-attention, so removing it changes no output, but attention and the K/V
    projections then cost the longest prompt's length instead of `max_sequence_length` (77 for CLIP, while
    most prompts are 10-20 tokens). Pairs that are None (no negative prompt) pass through.
    """
    masks = [mask for _, mask in encodings if mask is not None]
    used = torch.cat(masks).any(0).nonzero()
    length = int(used.max()) + 1 if len(used) else 1  # one host sync per pipeline call
    return [(None, None) if mask is None else (embeds[:, :length], mask[:, :length]) for embeds, mask in encodings]


class LatentDiTPipeline(DiffusionPipeline):
    r"""Text-to-image (or class-conditional, or unconditional) generation with a latent diffusion transformer.

    Components:
        vae: a diffusers `AutoencoderKL` or `AutoencoderTiny` (frozen), or None to denoise pixels directly.
        text_encoder / tokenizer: any transformers text encoder (CLIP, T5 encoder, BERT-like) and its
            tokenizer; None for class-conditional or unconditional models.
        transformer: a `LatentDiTTransformer2DModel`.
        scheduler: any diffusers scheduler matching the transformer's `prediction_type` (DDPM, DDIM,
            DPM-Solver++, Euler for "epsilon"/"v_prediction"; FlowMatchEuler for "flow").
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None, default_guidance_scale: float = 4.5):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, scheduler=scheduler)
        # The guidance `__call__` uses when given none: saved in model_index.json, so a model carries the one it
        # was trained and judged with (`latent-dit train` writes its `train.guidance_scale`).
        self.register_to_config(default_guidance_scale=default_guidance_scale)
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    # ------------------------------------------------------------------ prompt encoding
    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | None = None,
        num_images_per_prompt: int = 1,
        do_classifier_free_guidance: bool = True,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        max_sequence_length: int = 77,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
    ):
        """Encode prompts (and negative prompts when guiding) into token states, masks and pooled vectors.

        Returns `(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds)` followed by the same three
        for the negative prompt (None when not guiding), each repeated `num_images_per_prompt` times.
        Pooled vectors not given are pooled from the token states as the text encoder's family does.
        """
        device = device or self._execution_device
        dtype = self.transformer.dtype
        if prompt_embeds is None:
            prompt = [prompt] if isinstance(prompt, str) else prompt
            prompt_embeds, prompt_attention_mask = encode_text(self.tokenizer, self.text_encoder, prompt, device, max_sequence_length)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long, device=prompt_embeds.device)
        batch_size = prompt_embeds.shape[0]

        if do_classifier_free_guidance and negative_prompt_embeds is None:
            negative_prompt = negative_prompt or ""
            negative_prompt = batch_size * [negative_prompt] if isinstance(negative_prompt, str) else negative_prompt
            negative_prompt_embeds, negative_prompt_attention_mask = encode_text(
                self.tokenizer, self.text_encoder, negative_prompt, device, prompt_embeds.shape[1]
            )
        elif do_classifier_free_guidance and negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long, device=negative_prompt_embeds.device)

        def finish(embeds, mask, pooled):
            embeds, mask = embeds.to(device=device, dtype=dtype), mask.to(device)
            pooled = pool_prompt_embeds(embeds, mask, self.text_encoder) if pooled is None else pooled.to(device=device, dtype=dtype)
            repeat = num_images_per_prompt
            return embeds.repeat_interleave(repeat, 0), mask.repeat_interleave(repeat, 0), pooled.repeat_interleave(repeat, 0)

        positive = finish(prompt_embeds, prompt_attention_mask, pooled_prompt_embeds)
        negative = (
            finish(negative_prompt_embeds, negative_prompt_attention_mask, negative_pooled_prompt_embeds)
            if do_classifier_free_guidance else (None, None, None)
        )
        (embeds, mask), (negative_embeds, negative_mask) = trim_padding(positive[:2], negative[:2])
        return embeds, mask, positive[2], negative_embeds, negative_mask, negative[2]

    # ------------------------------------------------------------------ checks
    @property
    def _size_multiple(self) -> int:
        return self.vae_scale_factor * self.transformer.config.patch_size

    def check_inputs(
        self,
        prompt,
        height,
        width,
        negative_prompt=None,
        prompt_embeds=None,
        negative_prompt_embeds=None,
        prompt_attention_mask=None,
        negative_prompt_attention_mask=None,
        class_labels=None,
        output_type="pil",
        callback_on_step_end_tensor_inputs=None,
        guidance_interval=(0.0, 1.0),
    ):
        multiple = self._size_multiple
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of {multiple} (VAE factor {self.vae_scale_factor} × patch "
                f"size {self.transformer.config.patch_size}); got {height}×{width}. Nearest valid sizes: "
                f"{max(multiple, height // multiple * multiple)}×{max(multiple, width // multiple * multiple)} or "
                f"{(height // multiple + 1) * multiple}×{(width // multiple + 1) * multiple}."
            )
        if len(guidance_interval) != 2 or not 0.0 <= guidance_interval[0] < guidance_interval[1] <= 1.0:
            raise ValueError(f"guidance_interval must be (low, high) with 0 <= low < high <= 1 (noise levels, 1 = pure "
                             f"noise); got {tuple(guidance_interval)}. (0, 1) guides every step.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; choose one of {OUTPUT_TYPES}.")
        if callback_on_step_end_tensor_inputs is not None and not set(callback_on_step_end_tensor_inputs) <= set(self._callback_tensor_inputs):
            raise ValueError(
                f"callback_on_step_end_tensor_inputs {callback_on_step_end_tensor_inputs} must be a subset of {self._callback_tensor_inputs}."
            )
        self._check_scheduler()

        mode = self.transformer.config.conditioning
        if mode != "text":
            if prompt is not None or prompt_embeds is not None:
                raise ValueError(f"This model is {mode!r}-conditioned and takes no prompt; pass class_labels for a class model.")
            if mode == "class" and class_labels is None:
                raise ValueError("This model is class-conditional: pass class_labels (an int or a list of ints).")
            return
        if class_labels is not None:
            raise ValueError("class_labels are for class-conditional models; this one is text-conditioned: pass prompt.")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("Pass either `prompt` or `prompt_embeds`, not both.")
        if prompt is None and prompt_embeds is None:
            raise ValueError("Pass `prompt` (a string or a list of strings) or `prompt_embeds`.")
        if prompt is not None and not (isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(p, str) for p in prompt))):
            raise ValueError(f"`prompt` must be a string or a list of strings, got {type(prompt).__name__}.")
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("Pass either `negative_prompt` or `negative_prompt_embeds`, not both.")
        batch = len(prompt) if isinstance(prompt, list) else 1 if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, list) and len(negative_prompt) != batch:
            raise ValueError(f"negative_prompt has {len(negative_prompt)} entries but there are {batch} prompts; give one per prompt.")
        if prompt_embeds is not None and negative_prompt_embeds is not None and prompt_embeds.shape != negative_prompt_embeds.shape:
            raise ValueError(
                f"prompt_embeds {tuple(prompt_embeds.shape)} and negative_prompt_embeds {tuple(negative_prompt_embeds.shape)} must have the same shape."
            )
        for embeds, mask, name in (
            (prompt_embeds, prompt_attention_mask, "prompt"),
            (negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt"),
        ):
            if embeds is not None and mask is not None and tuple(mask.shape) != tuple(embeds.shape[:2]):
                raise ValueError(f"{name}_attention_mask {tuple(mask.shape)} must match {name}_embeds' batch and length {tuple(embeds.shape[:2])}.")

    def _check_scheduler(self):
        model_type = self.transformer.config.prediction_type
        is_flow = type(self.scheduler).__name__.startswith("FlowMatch")
        scheduler_type = "flow" if is_flow else self.scheduler.config.get("prediction_type", "epsilon")
        if scheduler_type != model_type:
            hint = "a FlowMatchEulerDiscreteScheduler" if model_type == "flow" else f"a scheduler with prediction_type={model_type!r}"
            raise ValueError(
                f"The scheduler {type(self.scheduler).__name__} predicts {scheduler_type!r} but the transformer was trained "
                f"for {model_type!r}; use {hint}, e.g. `Scheduler.from_config(pipe.scheduler.config)`."
            )

    # ------------------------------------------------------------------ latents
    def condition_inputs(self, conditional: dict, unconditional: dict) -> dict:
        """The transformer's condition inputs (text states, mask, pooled vector; or class labels) for the
        denoising loop. With classifier-free guidance each is stacked [unconditional; conditional] to match the
        doubled latents: once before the loop, again only if a step callback changes the prompt embeddings."""
        if not self.do_classifier_free_guidance:
            return conditional
        return {k: torch.cat([unconditional[k], conditional[k]]) for k in conditional}

    def prepare_latents(self, batch_size, num_channels, height, width, dtype, device, generator, latents=None):
        shape = (batch_size, num_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} images; pass one per image or a single one.")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)} but {shape} is needed for {batch_size} images of {height}×{width}.")
        else:
            latents = latents.to(device=device, dtype=dtype)
        # Flow-matching schedulers start from unit noise and have no init_noise_sigma (nor scale_model_input).
        return latents * getattr(self.scheduler, "init_noise_sigma", 1.0)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [-1, 1], undoing the VAE's scaling and shift (SD3/Flux VAEs have a shift)."""
        if self.vae is None:
            return latents
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        latents = latents / self.vae.config.scaling_factor + shift
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    # ------------------------------------------------------------------ properties
    @property
    def guidance_scale(self):
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self):
        return self._guidance_scale > 1.0

    @property
    def num_timesteps(self):
        return self._num_timesteps

    @property
    def interrupt(self):
        return self._interrupt

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float | None = None,
        guidance_interval: tuple[float, float] = (0.0, 1.0),
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        class_labels: int | list[int] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        max_sequence_length: int = 77,
    ):
        r"""Generate images.

        Args:
            prompt: the prompt(s) to draw (text models).
            negative_prompt: what to steer away from; "" when omitted and guiding.
            height, width: image size in pixels, multiples of VAE factor × patch size; default: the trained size.
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight; 1.0 disables guidance (one model pass per step).
                Default: the model's `default_guidance_scale` (in its model_index.json; 4.5 when it has none).
            guidance_interval: (low, high): guide only at steps whose noise level t / num_train_timesteps (1 = pure
                noise) lies in it; the other steps take one conditional pass. Guidance at high noise costs variety
                and at low noise does little (Kynkäänniemi et al. 2024, "Applying guidance in a limited interval").
            num_images_per_prompt: images per prompt.
            generator: torch generator(s) for reproducible sampling.
            latents: starting noise, shape (batch, C, height/f, width/f).
            prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask:
                precomputed text-encoder states (batch, L, D) and masks (batch, L) instead of text.
            pooled_prompt_embeds, negative_pooled_prompt_embeds: their pooled vectors (batch, D). When omitted they
                are pooled as the text encoder's family does (CLIP: the end-of-text state), which needs the text
                encoder; a pipeline without one takes the masked mean, so pass them for CLIP embeddings.
            class_labels: class index/indices for class-conditional models.
            output_type: "pil", "np", "pt" or "latent".
            return_dict: return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end: `fn(pipe, step, timestep, callback_kwargs) -> dict`, called after each step
                with the tensors named in `callback_on_step_end_tensor_inputs`; returned tensors replace them.
            max_sequence_length: tokens per prompt.
        """
        default_size = self.transformer.config.sample_size * self.vae_scale_factor
        height = default_size if height is None else height  # not `or`: height=0 is an error, not the default
        width = default_size if width is None else width

        # 1. Check inputs
        self.check_inputs(
            prompt, height, width, negative_prompt, prompt_embeds, negative_prompt_embeds,
            prompt_attention_mask, negative_prompt_attention_mask, class_labels, output_type,
            callback_on_step_end_tensor_inputs, guidance_interval,
        )
        if guidance_scale is None:
            guidance_scale = self.config.default_guidance_scale
        self._guidance_scale = guidance_scale
        self._interrupt = False
        device = self._execution_device
        mode = self.transformer.config.conditioning

        # 2. Encode the condition
        model_kwargs, negative_kwargs = {}, {}
        if mode == "text":
            (prompt_embeds, prompt_attention_mask, pooled, negative_prompt_embeds, negative_prompt_attention_mask,
             negative_pooled) = self.encode_prompt(
                prompt, device, num_images_per_prompt, self.do_classifier_free_guidance, negative_prompt,
                prompt_embeds, negative_prompt_embeds, prompt_attention_mask, negative_prompt_attention_mask,
                max_sequence_length, pooled_prompt_embeds, negative_pooled_prompt_embeds,
            )
            batch_size = prompt_embeds.shape[0]
            model_kwargs = {"encoder_hidden_states": prompt_embeds, "encoder_attention_mask": prompt_attention_mask,
                            "pooled_projections": pooled}
            negative_kwargs = {"encoder_hidden_states": negative_prompt_embeds,
                               "encoder_attention_mask": negative_prompt_attention_mask,
                               "pooled_projections": negative_pooled}
        elif mode == "class":
            labels = torch.as_tensor([class_labels] if isinstance(class_labels, int) else class_labels, device=device)
            num_classes = self.transformer.config.num_classes
            if labels.min() < 0 or labels.max() >= num_classes:
                raise ValueError(f"class_labels must lie in [0, {num_classes - 1}], got {labels.tolist()}.")
            labels = labels.repeat_interleave(num_images_per_prompt)
            model_kwargs = {"class_labels": labels}
            negative_kwargs = {"class_labels": torch.full_like(labels, num_classes)}  # the null label
            batch_size = labels.shape[0]
        else:
            self._guidance_scale = 1.0  # nothing to guide with
            batch_size = num_images_per_prompt

        # 3. Prepare timesteps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)

        # 4. Prepare latents
        num_channels = self.transformer.config.in_channels
        latents = self.prepare_latents(batch_size, num_channels, height, width, self.transformer.dtype, device, generator, latents)

        # 5. Prepare extra step kwargs (only stochastic schedulers take a generator)
        extra_step_kwargs = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}

        # 6. Denoising loop
        kwargs = self.condition_inputs(model_kwargs, negative_kwargs)
        low, high = guidance_interval
        noise_levels = (timesteps.float() / self.scheduler.config.num_train_timesteps).tolist()
        guided = [self.do_classifier_free_guidance and low <= level <= high for level in noise_levels]
        with self.progress_bar(total=num_inference_steps) as progress_bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latent_model_input = latents
                if hasattr(self.scheduler, "scale_model_input"):
                    latent_model_input = self.scheduler.scale_model_input(latents, t)
                if guided[i]:
                    # Batched classifier-free guidance: one pass over [unconditional; conditional].
                    latent_model_input = torch.cat([latent_model_input] * 2)
                timestep = t.expand(latent_model_input.shape[0]).to(device)
                noise_pred = self.transformer(latent_model_input, timestep, return_dict=False,
                                              **(kwargs if guided[i] else model_kwargs))[0]
                noise_pred = noise_pred[:, :num_channels]  # drop the learned-sigma half, if any
                if guided[i]:
                    noise_uncond, noise_cond = noise_pred.chunk(2)
                    noise_pred = noise_uncond + guidance_scale * (noise_cond - noise_uncond)

                latents = self.scheduler.step(noise_pred, t, latents, **extra_step_kwargs, return_dict=False)[0]

                if callback_on_step_end is not None:
                    # A loop, not a comprehension: before Python 3.12 `locals()` in a comprehension is the
                    # comprehension's own scope and has no `latents`.
                    callback_kwargs = {}
                    for k in callback_on_step_end_tensor_inputs:
                        callback_kwargs[k] = locals()[k]
                    callback_outputs = callback_on_step_end(self, i, t, callback_kwargs)
                    latents = callback_outputs.pop("latents", latents)
                    if mode == "text" and {"prompt_embeds", "negative_prompt_embeds"} & callback_outputs.keys():
                        prompt_embeds = callback_outputs.pop("prompt_embeds", prompt_embeds)
                        negative_prompt_embeds = callback_outputs.pop("negative_prompt_embeds", negative_prompt_embeds)
                        model_kwargs["encoder_hidden_states"] = prompt_embeds
                        negative_kwargs["encoder_hidden_states"] = negative_prompt_embeds
                        kwargs = self.condition_inputs(model_kwargs, negative_kwargs)
                progress_bar.update()

        # 7. Decode
        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
