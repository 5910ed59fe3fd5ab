"""The diffusion objective: noising, regression targets and loss weighting, kept apart from the network.

The network only predicts (the k-diffusion lesson); this module owns the maths that turns clean latents
into a training example and a loss, and names the diffusers scheduler that samples the trained model.

Three objectives share one convention: the model is called as ``model(x_t, timestep, ...)`` with float
timesteps in [0, 1000], exactly what the matching diffusers scheduler feeds it at inference.

* ``"epsilon"``      DDPM (Ho et al. 2020): x_t = sqrt(ᾱ_t) x0 + sqrt(1-ᾱ_t) ε (Eq. 4), predict ε (Eq. 14).
* ``"v_prediction"`` same x_t, predict v = sqrt(ᾱ_t) ε - sqrt(1-ᾱ_t) x0 (Salimans & Ho 2022, Sec. 4).
* ``"flow"``         rectified flow as in SD3 (Esser et al. 2024): x_t = (1-σ) x0 + σ ε, predict the
                     velocity dx_t/dσ = ε - x0; the model sees timestep = σ·1000 (FlowMatchEulerDiscreteScheduler).

For epsilon/v the schedule (ᾱ_t) comes from diffusers' ``DDPMScheduler``, so training and sampling read
the same betas. Nothing here calls ``.item()``: every step stays on the device without a host sync.
"""

from __future__ import annotations

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")

# Flow timesteps are σ·1000, the scale FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000) uses.
FLOW_NUM_TRAIN_TIMESTEPS = 1000

# Named beta schedules. diffusers' defaults (beta_start=1e-4, beta_end=0.02) are only right for "linear";
# "scaled_linear" needs Stable Diffusion's own endpoints, so each name carries its full setting.
BETA_SCHEDULES = {
    "linear": dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),  # DDPM / ADM / DiT
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),  # Stable Diffusion
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),  # cosine, Nichol & Dhariwal 2021
}

# Samplers for the trained model: the first of each list is the default.
INFERENCE_SAMPLERS = {
    "epsilon": ("dpm_solver", "ddim"),
    "v_prediction": ("dpm_solver", "ddim"),
    "flow": ("euler",),
}


def _check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type={prediction_type!r} is not one of {list(PREDICTION_TYPES)}")


def _check_flow_timesteps(num_train_timesteps: int) -> None:
    if num_train_timesteps != FLOW_NUM_TRAIN_TIMESTEPS:
        raise ValueError(
            f"num_train_timesteps={num_train_timesteps} is not supported for 'flow': "
            f"its timesteps are σ·{FLOW_NUM_TRAIN_TIMESTEPS}"
        )


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (N,) tensor so it broadcasts over the (N, C, H, W) ``like``."""
    return values.reshape(-1, *([1] * (like.ndim - 1)))


class DiffusionObjective:
    """Noising, targets and (min-SNR) loss weights for one prediction type."""

    def __init__(
        self,
        prediction_type: str,
        noise_scheduler: DDPMScheduler | None = None,
        snr_gamma: float | None = None,
        logit_normal_mean: float = 0.0,
        logit_normal_std: float = 1.0,
    ):
        _check_prediction_type(prediction_type)
        if prediction_type == "flow":
            if noise_scheduler is not None:
                raise ValueError("prediction_type='flow' takes no noise_scheduler; pass noise_scheduler=None")
            self.num_train_timesteps = FLOW_NUM_TRAIN_TIMESTEPS
        else:
            if noise_scheduler is None:
                raise ValueError(f"prediction_type={prediction_type!r} needs a DDPMScheduler as noise_scheduler")
            if noise_scheduler.config.prediction_type != prediction_type:
                raise ValueError(
                    f"noise_scheduler.config.prediction_type={noise_scheduler.config.prediction_type!r} "
                    f"does not match prediction_type={prediction_type!r}"
                )
            self.num_train_timesteps = noise_scheduler.config.num_train_timesteps
        if snr_gamma is not None and snr_gamma <= 0:
            raise ValueError(f"snr_gamma={snr_gamma!r} must be positive, or None to disable min-SNR weighting")
        if logit_normal_std <= 0:
            raise ValueError(f"logit_normal_std={logit_normal_std!r} must be positive")
        self.prediction_type = prediction_type
        self.noise_scheduler = noise_scheduler
        self.snr_gamma = snr_gamma
        self.logit_normal_mean = logit_normal_mean
        self.logit_normal_std = logit_normal_std
        self._alphas_cumprod_by_device: dict[torch.device, torch.Tensor] = {}

    def __repr__(self) -> str:
        return (
            f"DiffusionObjective(prediction_type={self.prediction_type!r}, "
            f"num_train_timesteps={self.num_train_timesteps}, snr_gamma={self.snr_gamma})"
        )

    # --- the noise level of a timestep -----------------------------------------------------------------

    def _alphas_cumprod(self, device: torch.device) -> torch.Tensor:
        # One copy per device, made once: a host-to-device copy every step would stall the GPU.
        if device not in self._alphas_cumprod_by_device:
            alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
            self._alphas_cumprod_by_device[device] = alphas_cumprod
        return self._alphas_cumprod_by_device[device]

    def _signal_and_noise_scales(
        self, timesteps: torch.Tensor, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(a_t, b_t) in float32 with x_t = a_t x0 + b_t ε, one pair per sample."""
        timesteps = timesteps.to(device)
        if self.prediction_type == "flow":
            sigmas = timesteps.float() / self.num_train_timesteps
            return 1.0 - sigmas, sigmas
        # DDPM timesteps are integers carried as floats; round so 998.9999 still indexes step 999.
        alphas_cumprod = self._alphas_cumprod(device)[timesteps.round().long()]
        return alphas_cumprod.sqrt(), (1.0 - alphas_cumprod).sqrt()

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio a_t² / b_t² per sample, float32."""
        signal, noise = self._signal_and_noise_scales(timesteps, timesteps.device)
        return (signal / noise) ** 2

    # --- training example ----------------------------------------------------------------------------

    def sample_timesteps(
        self,
        batch_size: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """Float timesteps in [0, 1000] for one batch, on ``device``."""
        # Draw where the generator lives (a CPU generator cannot fill a CUDA tensor), then move.
        draw_device = generator.device if generator is not None else device
        if self.prediction_type == "flow":
            # Logit-normal σ (Esser et al. 2024, Sec. 3.1): σ = sigmoid(u), u ~ N(m, s); with m=0 it puts
            # most samples at mid noise levels, where the velocity is hardest to predict.
            u = torch.randn(batch_size, generator=generator, device=draw_device)
            sigmas = torch.sigmoid(u * self.logit_normal_std + self.logit_normal_mean)
            return (sigmas * self.num_train_timesteps).to(device)
        # DDPM: t uniform over the training steps 0..T-1 (Ho et al. 2020, Algorithm 1).
        timesteps = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator, device=draw_device)
        return timesteps.float().to(device)

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = a_t x0 + b_t ε, in the latents' dtype."""
        signal, noise_scale = self._signal_and_noise_scales(timesteps, latents.device)
        signal = _per_sample(signal, latents).to(latents.dtype)
        noise_scale = _per_sample(noise_scale, latents).to(latents.dtype)
        return signal * latents + noise_scale * noise

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """What the model should output at x_t = add_noise(latents, noise, timesteps)."""
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "flow":
            # d/dσ [(1-σ) x0 + σ ε] = ε - x0; the flow scheduler steps x += (σ_next - σ) · velocity.
            return noise - latents
        # v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0 (Salimans & Ho 2022), as diffusers' DDPMScheduler.get_velocity.
        signal, noise_scale = self._signal_and_noise_scales(timesteps, latents.device)
        signal = _per_sample(signal, latents).to(latents.dtype)
        noise_scale = _per_sample(noise_scale, latents).to(latents.dtype)
        return signal * noise - noise_scale * latents

    # --- loss ----------------------------------------------------------------------------------------

    def loss_weights(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss weights (float32, shape (N,)): min-SNR-γ, or ones when ``snr_gamma`` is None.

        Min-SNR-γ (Hang et al. 2023) weights the x0 error by min(SNR, γ). Each target's error is a fixed
        multiple of the x0 error at a given x_t, so the weight on the target's MSE is
        min(SNR, γ) · (x0 error / target error)²:
          epsilon: x0 = (x_t - b ε) / a                   -> min(SNR, γ) / SNR
          v (VP):  x0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v        -> min(SNR, γ) · (1-ᾱ) = min(SNR, γ) / (SNR + 1)
          flow:    x0 = x_t - σ (ε - x0)                  -> min(SNR, γ) · σ², SNR = ((1-σ)/σ)²
        The flow line is the same rule, not diffusers' v-formula reused: rectified flow is not variance
        preserving, so σ² ≠ 1/(SNR + 1) there.
        """
        if self.snr_gamma is None:
            return torch.ones(timesteps.shape, device=timesteps.device, dtype=torch.float32)
        signal, noise_scale = self._signal_and_noise_scales(timesteps, timesteps.device)
        snr = (signal / noise_scale) ** 2
        clipped_snr = snr.clamp(max=self.snr_gamma)
        if self.prediction_type == "epsilon":
            return clipped_snr / snr
        if self.prediction_type == "v_prediction":
            return clipped_snr / (snr + 1.0)
        return clipped_snr * noise_scale**2

    def loss(
        self,
        model_output: torch.Tensor,
        latents: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
    ) -> torch.Tensor:
        """Scalar loss: per-sample MSE (mean over all but the batch dim) times its weight, mean over the batch."""
        target = self.target(latents, noise, timesteps)
        # float32 so a bf16 model still gets an accurate loss (and gradient scale).
        squared_error = (model_output.float() - target.float()) ** 2
        per_sample = squared_error.mean(dim=tuple(range(1, squared_error.ndim)))
        return (per_sample * self.loss_weights(timesteps).to(per_sample.device)).mean()


def build_noise_scheduler(
    prediction_type: str, num_train_timesteps: int = 1000, beta_schedule: str = "linear"
) -> DDPMScheduler:
    """diffusers' DDPMScheduler for an epsilon/v objective (its alphas_cumprod define the schedule)."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type={prediction_type!r} has no DDPM schedule; use 'epsilon' or 'v_prediction'")
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(f"beta_schedule={beta_schedule!r} is not one of {list(BETA_SCHEDULES)}")
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        prediction_type=prediction_type,
        # Latents are not in [-1, 1]; clipping the x0 estimate would distort them.
        clip_sample=False,
        **BETA_SCHEDULES[beta_schedule],
    )


def build_objective(
    prediction_type: str,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    snr_gamma: float | None = None,
    logit_normal_mean: float = 0.0,
    logit_normal_std: float = 1.0,
) -> DiffusionObjective:
    """The training objective. ``num_train_timesteps``/``beta_schedule`` shape epsilon/v only (flow is
    always σ·1000); ``logit_normal_*`` shape flow only."""
    _check_prediction_type(prediction_type)
    if prediction_type == "flow":
        _check_flow_timesteps(num_train_timesteps)
        noise_scheduler = None
    else:
        noise_scheduler = build_noise_scheduler(prediction_type, num_train_timesteps, beta_schedule)
    return DiffusionObjective(
        prediction_type,
        noise_scheduler=noise_scheduler,
        snr_gamma=snr_gamma,
        logit_normal_mean=logit_normal_mean,
        logit_normal_std=logit_normal_std,
    )


def build_inference_scheduler(
    prediction_type: str,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    sampler: str | None = None,
):
    """A diffusers scheduler that samples a model trained with ``build_objective`` on the same arguments.

    ``sampler``: "dpm_solver" (default) or "ddim" for epsilon/v; "euler" (the only one) for flow.
    """
    _check_prediction_type(prediction_type)
    choices = INFERENCE_SAMPLERS[prediction_type]
    sampler = choices[0] if sampler is None else sampler
    if sampler not in choices:
        raise ValueError(f"sampler={sampler!r} is not one of {list(choices)} for prediction_type={prediction_type!r}")

    if prediction_type == "flow":
        _check_flow_timesteps(num_train_timesteps)
        # shift=1.0: training sampled σ without a resolution shift, so sampling uses the same σ axis.
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=FLOW_NUM_TRAIN_TIMESTEPS, shift=1.0)

    # Same betas and prediction_type as training; built from the DDPM config so the two cannot drift.
    training_config = build_noise_scheduler(prediction_type, num_train_timesteps, beta_schedule).config
    # "trailing" spacing starts sampling at t = T-1, the noise level x_T really has
    # (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.3).
    if sampler == "ddim":
        return DDIMScheduler.from_config(training_config, timestep_spacing="trailing")
    return DPMSolverMultistepScheduler.from_config(training_config, timestep_spacing="trailing")
