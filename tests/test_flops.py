"""latent_dit.flops: the model FLOPs of a training step (the MFU numerator) and the peak (its denominator)."""

import pytest
import torch

from latent_dit.flops import peak_flops, training_step_flops
from latent_dit.model import LatentDiTTransformer2DModel


def test_a_step_counts_three_forwards_of_matmuls_per_token_per_image_and_attention():
    batch, depth, width, latent, patch = 2, 2, 32, 8, 2
    model = LatentDiTTransformer2DModel(conditioning="class", depth=depth, hidden_size=width, num_heads=2,
                                        patch_size=patch, in_channels=4, sample_size=latent, num_classes=10)
    tokens = (latent // patch) ** 2
    per_token = (4 * patch * patch * width  # patchify convolution
                 + depth * (3 * width * width + width * width + 2 * 4 * width * width)  # qkv, out projection, MLP
                 + width * patch * patch * 4)  # final linear
    per_image = 256 * width + width * width + depth * 6 * width * width + 2 * width * width  # timestep MLP, adaLN
    attention = depth * 4 * batch * tokens**2 * width  # q·kᵀ and weights·v
    forward = 2 * batch * tokens * per_token + 2 * batch * per_image + attention

    x = torch.randn(batch, 4, latent, latent)
    counted = training_step_flops(model, x, timestep=torch.tensor([1, 500]), class_labels=torch.tensor([0, 3]))
    assert counted == 3 * forward


def test_text_model_counts_text_tokens_and_cross_attention_the_same_in_bf16_and_fp32():
    """bf16 on a CPU writes attention out (matmuls); fp32 runs PyTorch's fused CPU kernel, which PyTorch's own
    counter skips (latent_dit.flops registers it): both count the same, and text-side weights once per token."""
    batch, depth, width, latent, patch, text_len, text_dim = 2, 2, 32, 8, 2, 7, 16
    model = LatentDiTTransformer2DModel(conditioning="text", depth=depth, hidden_size=width, num_heads=2, patch_size=patch,
                                        in_channels=4, sample_size=latent, text_embed_dim=text_dim, adaln_single=True)
    tokens = (latent // patch) ** 2
    per_token = 4 * patch * patch * width + depth * 14 * width * width + width * patch * patch * 4  # + cross q, out
    per_text_token = text_dim * width + width * width + depth * 2 * width * width  # text projection, cross k and v
    per_image = 256 * width + width * width + text_dim * width + 6 * width * width + 2 * width * width
    attention = depth * 4 * batch * tokens * (tokens + text_len) * width  # self (16 keys) and cross (7, padding too)
    forward = 2 * batch * (tokens * per_token + text_len * per_text_token + per_image) + attention

    text, mask = torch.randn(batch, text_len, text_dim), torch.ones(batch, text_len, dtype=torch.long)
    mask[1, 4:] = 0
    inputs = dict(timestep=torch.tensor([1, 500]), encoder_hidden_states=text, encoder_attention_mask=mask,
                  pooled_projections=text[:, 0])
    x = torch.randn(batch, 4, latent, latent)
    assert training_step_flops(model, x, **inputs) == 3 * forward
    assert training_step_flops(model, x, autocast_dtype=torch.bfloat16, **inputs) == 3 * forward


@pytest.mark.parametrize("name, tflops", [("NVIDIA H100 80GB HBM3", 989.5), ("NVIDIA H100 PCIe", 756.0),
                                          ("NVIDIA H200", 989.5), ("NVIDIA A100-SXM4-80GB", 312.0)])
def test_gpu_peaks_are_the_datasheet_dense_bf16_figures(name, tflops, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = peak_flops(torch.device("cuda"))
    assert peak == tflops * 1e12 and "datasheet" in source
    assert peak_flops(torch.device("cuda"), torch.float32)[0] is None


def test_cpu_peak_is_a_measured_gemm_rate():
    peak, source = peak_flops(torch.device("cpu"), torch.float32)
    assert 1e9 < peak < 1e14 and source.startswith("measured")
