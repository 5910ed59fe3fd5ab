"""Closed-form checks of latent_dit.objective: noising, targets, timestep sampling, min-SNR weights, loss,
and that the inference scheduler it names really samples a model trained on its targets."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from latent_dit.objective import DiffusionObjective, build_inference_scheduler, build_objective


def _randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _known_snr_objective(prediction_type, snr_gamma=5.0):
    """A 3-step schedule with ᾱ = [0.9, 0.5, 0.1], i.e. SNR = ᾱ/(1-ᾱ) = [9, 1, 1/9]."""
    scheduler = DDPMScheduler(num_train_timesteps=3, trained_betas=[0.1, 4 / 9, 0.8], prediction_type=prediction_type)
    torch.testing.assert_close(scheduler.alphas_cumprod, torch.tensor([0.9, 0.5, 0.1]))
    return DiffusionObjective(prediction_type, noise_scheduler=scheduler, snr_gamma=snr_gamma)


# --- noising and targets ---------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_noising_and_targets_match_diffusers(prediction_type, beta_schedule):
    objective = build_objective(prediction_type, beta_schedule=beta_schedule)
    reference = DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule=beta_schedule,
        beta_start=0.0001 if beta_schedule == "linear" else 0.00085,
        beta_end=0.02 if beta_schedule == "linear" else 0.012,
        prediction_type=prediction_type,
    )
    latents, noise = _randn(4, 4, 8, 8, seed=0), _randn(4, 4, 8, 8, seed=1)
    int_timesteps = torch.tensor([0, 10, 500, 999])

    x_t = objective.add_noise(latents, noise, int_timesteps.float())
    torch.testing.assert_close(x_t, reference.add_noise(latents, noise, int_timesteps))

    expected_target = noise if prediction_type == "epsilon" else reference.get_velocity(latents, noise, int_timesteps)
    torch.testing.assert_close(objective.target(latents, noise, int_timesteps.float()), expected_target)


def test_v_prediction_inverts_to_clean_latents_and_noise():
    objective = build_objective("v_prediction")
    latents, noise = _randn(3, 4, 8, 8, seed=0), _randn(3, 4, 8, 8, seed=1)
    timesteps = torch.tensor([1.0, 400.0, 999.0])
    x_t = objective.add_noise(latents, noise, timesteps)
    v = objective.target(latents, noise, timesteps)

    alphas_cumprod = objective.noise_scheduler.alphas_cumprod[timesteps.long()].view(-1, 1, 1, 1)
    # Salimans & Ho 2022: x0 = sqrt(ᾱ) x_t - sqrt(1-ᾱ) v and ε = sqrt(1-ᾱ) x_t + sqrt(ᾱ) v.
    signal, noise_scale = alphas_cumprod.sqrt(), (1 - alphas_cumprod).sqrt()
    torch.testing.assert_close(signal * x_t - noise_scale * v, latents, atol=1e-5, rtol=0)
    torch.testing.assert_close(noise_scale * x_t + signal * v, noise, atol=1e-5, rtol=0)


def test_flow_noising_is_the_straight_line_from_data_to_noise():
    objective = build_objective("flow")
    latents, noise = _randn(4, 4, 8, 8, seed=0), _randn(4, 4, 8, 8, seed=1)
    timesteps = torch.tensor([0.0, 250.0, 500.0, 1000.0])  # σ = 0, 1/4, 1/2, 1
    x_t = objective.add_noise(latents, noise, timesteps)

    torch.testing.assert_close(x_t[0], latents[0])
    torch.testing.assert_close(x_t[1], 0.75 * latents[1] + 0.25 * noise[1])
    torch.testing.assert_close(x_t[2], 0.5 * latents[2] + 0.5 * noise[2])
    torch.testing.assert_close(x_t[3], noise[3])

    velocity = objective.target(latents, noise, timesteps)
    torch.testing.assert_close(velocity, noise - latents)
    sigmas = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t - sigmas * velocity, latents, atol=1e-6, rtol=0)  # x0 = x_t - σ v
    torch.testing.assert_close(x_t + (1 - sigmas) * velocity, noise, atol=1e-6, rtol=0)  # ε = x_t + (1-σ) v


def test_flow_noising_matches_diffusers_scale_noise():
    objective = build_objective("flow")
    scheduler = build_inference_scheduler("flow")
    scheduler.set_timesteps(4)
    latents, noise = _randn(4, 4, 8, 8, seed=0), _randn(4, 4, 8, 8, seed=1)
    timesteps = scheduler.timesteps.clone()
    torch.testing.assert_close(timesteps, torch.tensor([1000.0, 667.0, 334.0, 1.0]))  # σ from 1 to 1/1000
    torch.testing.assert_close(
        objective.add_noise(latents, noise, timesteps), scheduler.scale_noise(latents, timesteps, noise)
    )


def test_add_noise_keeps_latents_dtype():
    for prediction_type in ["epsilon", "v_prediction", "flow"]:
        objective = build_objective(prediction_type)
        latents = _randn(2, 4, 8, 8, dtype=torch.bfloat16)
        timesteps = torch.tensor([3.0, 900.0])
        assert objective.add_noise(latents, latents, timesteps).dtype == torch.bfloat16
        assert objective.target(latents, latents, timesteps).dtype == torch.bfloat16


# --- the inference scheduler steps along the path the objective trained on ------------------------------


@pytest.mark.parametrize(
    "prediction_type, sampler", [("epsilon", "ddim"), ("v_prediction", "ddim"), ("flow", "euler")]
)
def test_one_sampler_step_with_the_exact_target_lands_on_the_next_noisy_latents(prediction_type, sampler):
    # For one fixed (x0, ε) pair, a deterministic step fed the true target must reproduce add_noise at the
    # next timestep: this fails if the training and sampling conventions disagree.
    objective = build_objective(prediction_type)
    scheduler = build_inference_scheduler(prediction_type, sampler=sampler)
    scheduler.set_timesteps(10)
    latents, noise = _randn(2, 4, 8, 8, seed=0), _randn(2, 4, 8, 8, seed=1)

    t, t_next = scheduler.timesteps[2], scheduler.timesteps[3]
    timesteps, next_timesteps = t.float().expand(2), t_next.float().expand(2)
    x_t = objective.add_noise(latents, noise, timesteps)
    model_output = objective.target(latents, noise, timesteps)
    stepped = scheduler.step(model_output, t, x_t).prev_sample
    torch.testing.assert_close(stepped, objective.add_noise(latents, noise, next_timesteps), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # inside diffusers' DPM-Solver
@pytest.mark.parametrize(
    "prediction_type, sampler",
    [
        ("epsilon", "dpm_solver"),
        ("epsilon", "ddim"),
        ("v_prediction", "dpm_solver"),
        ("v_prediction", "ddim"),
        ("flow", "euler"),
    ],
)
def test_sampling_with_the_ideal_model_recovers_gaussian_data(prediction_type, sampler):
    # 1-D toy data x0 ~ N(0, s²). x_t = a x0 + b ε and the target c x0 + d ε are jointly Gaussian, so the
    # ideal model is the regression E[target | x_t] = (c a s² + d b) / (a² s² + b²) · x_t. Sampling with it
    # from pure noise must give back std s.
    data_std = 0.5
    objective = build_objective(prediction_type)
    scheduler = build_inference_scheduler(prediction_type, sampler=sampler)
    # Enough steps that the discretization error (~1/steps for the first-order DDIM and Euler) stays
    # below the tolerance; a wrong convention misses by far more.
    scheduler.set_timesteps(50 if sampler == "dpm_solver" else 100)

    def ideal_model(x_t, timestep):
        timesteps = timestep.float().expand(x_t.shape[0])
        ones, zeros = torch.ones_like(x_t), torch.zeros_like(x_t)
        a, b = objective.add_noise(ones, zeros, timesteps), objective.add_noise(zeros, ones, timesteps)
        c, d = objective.target(ones, zeros, timesteps), objective.target(zeros, ones, timesteps)
        return (c * a * data_std**2 + d * b) / (a**2 * data_std**2 + b**2) * x_t

    # Every step is linear in x, so standardising the starting noise removes the sampling error.
    x = _randn(1024, 1, seed=3)
    x = (x - x.mean()) / x.std() * getattr(scheduler, "init_noise_sigma", 1.0)
    for t in scheduler.timesteps:
        x = scheduler.step(ideal_model(x, t), t, x).prev_sample
    assert abs(x.mean().item()) < 1e-3
    assert x.std().item() == pytest.approx(data_std, abs=0.015)


# --- timestep sampling -----------------------------------------------------------------------------------


def test_ddpm_timesteps_are_uniform_integers_as_floats():
    objective = build_objective("epsilon")
    timesteps = objective.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert timesteps.dtype == torch.float32 and timesteps.shape == (20000,)
    assert torch.equal(timesteps, timesteps.round())
    assert timesteps.min().item() == 0 and timesteps.max().item() == 999
    assert timesteps.mean().item() == pytest.approx(499.5, abs=10)  # 4.5 standard errors
    again = objective.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(timesteps, again)


@pytest.mark.parametrize("mean, std", [(0.0, 1.0), (1.0, 0.5)])
def test_flow_timesteps_are_logit_normal(mean, std):
    objective = build_objective("flow", logit_normal_mean=mean, logit_normal_std=std)
    timesteps = objective.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < timesteps.min().item() and timesteps.max().item() < 1000
    # sigmoid is monotone, so the quantiles of σ are sigmoid of the normal's: median sigmoid(m),
    # 84th percentile sigmoid(m + s).
    sigmoid = lambda z: 1000 / (1 + math.exp(-z))  # noqa: E731
    assert timesteps.median().item() == pytest.approx(sigmoid(mean), abs=8)
    assert timesteps.quantile(0.8413).item() == pytest.approx(sigmoid(mean + std), abs=8)
    if mean == 0.0:
        assert timesteps.median().item() == pytest.approx(500, abs=8)


# --- min-SNR weights -------------------------------------------------------------------------------------


def test_min_snr_weights_for_epsilon_and_v_at_known_snrs():
    timesteps = torch.tensor([0.0, 1.0, 2.0])  # SNR 9, 1, 1/9
    epsilon = _known_snr_objective("epsilon", snr_gamma=5.0)
    torch.testing.assert_close(epsilon.snr(timesteps), torch.tensor([9.0, 1.0, 1 / 9]))
    # min(SNR, γ) / SNR
    torch.testing.assert_close(epsilon.loss_weights(timesteps), torch.tensor([5 / 9, 1.0, 1.0]))
    # min(SNR, γ) / (SNR + 1)
    v = _known_snr_objective("v_prediction", snr_gamma=5.0)
    torch.testing.assert_close(v.loss_weights(timesteps), torch.tensor([0.5, 0.5, 0.1]))


def test_min_snr_weights_for_flow_at_known_snrs():
    objective = build_objective("flow", snr_gamma=5.0)
    timesteps = torch.tensor([200.0, 250.0, 500.0, 800.0])  # σ = 0.2, 0.25, 0.5, 0.8 -> SNR 16, 9, 1, 1/16
    torch.testing.assert_close(objective.snr(timesteps), torch.tensor([16.0, 9.0, 1.0, 1 / 16]))
    # min(SNR, γ) · σ²
    torch.testing.assert_close(
        objective.loss_weights(timesteps), torch.tensor([5 * 0.04, 5 * 0.0625, 0.25, 0.64 / 16]), rtol=1e-5, atol=0
    )


def test_without_snr_gamma_all_weights_are_one():
    for prediction_type in ["epsilon", "v_prediction", "flow"]:
        weights = build_objective(prediction_type).loss_weights(torch.tensor([0.0, 500.0, 999.0]))
        torch.testing.assert_close(weights, torch.ones(3))


# --- loss ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "flow"])
def test_loss_is_zero_at_the_target(prediction_type):
    objective = build_objective(prediction_type, snr_gamma=5.0)
    latents, noise = _randn(3, 4, 8, 8, seed=0), _randn(3, 4, 8, 8, seed=1)
    timesteps = objective.sample_timesteps(3, generator=torch.Generator().manual_seed(0))
    loss = objective.loss(objective.target(latents, noise, timesteps), latents, noise, timesteps)
    assert loss.shape == () and loss.item() == 0.0


def test_loss_matches_hand_computation():
    latents, noise = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)  # epsilon target = 1 everywhere
    model_output = torch.stack([torch.zeros(4, 2, 2), torch.full((4, 2, 2), 3.0)])  # per-sample MSE 1 and 4
    timesteps = torch.tensor([0.0, 1.0])  # SNR 9 and 1 in the known schedule

    unweighted = _known_snr_objective("epsilon", snr_gamma=None)
    assert unweighted.loss(model_output, latents, noise, timesteps).item() == pytest.approx((1 + 4) / 2)
    weighted = _known_snr_objective("epsilon", snr_gamma=5.0)  # weights 5/9 and 1
    assert weighted.loss(model_output, latents, noise, timesteps).item() == pytest.approx((1 * 5 / 9 + 4 * 1) / 2)


def test_loss_is_float32_and_differentiable_for_bf16_outputs():
    objective = build_objective("flow", snr_gamma=5.0)
    latents, noise = _randn(2, 4, 8, 8, seed=0), _randn(2, 4, 8, 8, seed=1)
    model_output = torch.zeros(2, 4, 8, 8, dtype=torch.bfloat16, requires_grad=True)
    timesteps = torch.tensor([250.0, 750.0])
    loss = objective.loss(model_output, latents, noise, timesteps)
    loss.backward()
    assert loss.dtype == torch.float32
    assert model_output.grad is not None and model_output.grad.abs().sum().item() > 0


# --- builders --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prediction_type, sampler, scheduler_class",
    [
        ("epsilon", None, DPMSolverMultistepScheduler),
        ("epsilon", "ddim", DDIMScheduler),
        ("v_prediction", None, DPMSolverMultistepScheduler),
        ("v_prediction", "ddim", DDIMScheduler),
        ("flow", None, FlowMatchEulerDiscreteScheduler),
    ],
)
def test_inference_scheduler_matches_the_training_schedule(prediction_type, sampler, scheduler_class):
    scheduler = build_inference_scheduler(prediction_type, beta_schedule="scaled_linear", sampler=sampler)
    assert type(scheduler) is scheduler_class
    if prediction_type == "flow":
        assert scheduler.config.shift == 1.0 and scheduler.config.num_train_timesteps == 1000
        return
    assert scheduler.config.prediction_type == prediction_type
    training = build_objective(prediction_type, beta_schedule="scaled_linear").noise_scheduler
    torch.testing.assert_close(scheduler.alphas_cumprod, training.alphas_cumprod)


def test_invalid_choices_raise_errors_naming_them():
    with pytest.raises(ValueError, match="'x0'"):
        build_objective("x0")
    with pytest.raises(ValueError, match="'cosine'"):
        build_objective("epsilon", beta_schedule="cosine")
    with pytest.raises(ValueError, match="'ddim'"):
        build_inference_scheduler("flow", sampler="ddim")
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        build_objective("flow", num_train_timesteps=500)
    with pytest.raises(ValueError, match="does not match"):
        DiffusionObjective("v_prediction", noise_scheduler=DDPMScheduler(prediction_type="epsilon"))
