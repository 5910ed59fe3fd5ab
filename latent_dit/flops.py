"""Model FLOPs of a training step, and model-FLOPs utilisation (MFU), counted the same way for any model.

The FLOPs are counted, not estimated: torch's `FlopCounterMode` records every matmul, convolution and
attention product of one forward pass (2 FLOPs per multiply-add), and a training step is 3× that, since the
backward pass does two matmuls for each forward one (the gradients of the input and of the weight). For a
transformer this is the usual 6 × parameters × tokens plus attention (12 × tokens² × width per layer for
self-attention), without the shortcut's errors: weights applied once per image (adaLN, the timestep MLP)
count once per image, text-side weights once per text token. Elementwise work (norms, activations, the
optimizer) is not counted, and neither is recomputation (gradient checkpointing, attention weights recomputed
in backward): it is work the hardware does, not work the model needs.

MFU = model FLOPs per step / step time / the accelerator's peak. GPU peaks are the datasheets' dense bf16
figures; a CPU has no such figure here, so its "peak" is measured: the best rate of a large bf16 GEMM on the
machine, which makes the CPU figure a share of what this machine's GEMMs reach, not of a theoretical peak.
"""

import time

import torch
from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

# Dense (no sparsity) bf16 tensor-core peaks from NVIDIA's datasheets, TFLOP/s, by a part of the device name.
GPU_PEAK_BF16_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.5), ("H100 NVL", 835.5), ("H100 PCIe", 756.0),
                        ("H100", 989.5), ("A100", 312.0), ("L40S", 362.1), ("A10G", 70.0), ("L4", 121.0))


def _count_cpu_flash_attention():
    """PyTorch counts its CUDA attention kernels but not the CPU one (`_scaled_dot_product_flash_attention_for_cpu`):
    give it the same formula, so a CPU run counts the attention that a GPU run counts."""
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is None:
        return

    @register_flop_formula(op, get_raw=True)
    def _cpu_flash_flop(query, key, value, *args, out_val=None, **kwargs) -> int:
        return sdpa_flop_count(query.shape, key.shape, value.shape)


_count_cpu_flash_attention()


def training_step_flops(model: torch.nn.Module, *args, autocast_dtype: torch.dtype | None = None, **kwargs) -> int:
    """Model FLOPs of one training step (forward + backward) on these inputs: 3 × the counted forward."""
    device_type = next(model.parameters()).device.type
    with torch.no_grad(), FlopCounterMode(display=False) as counter, torch.autocast(
            device_type, dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype not in (None, torch.float32)):
        model(*args, **kwargs)
    return 3 * counter.get_total_flops()


def peak_flops(device: torch.device, dtype: torch.dtype = torch.bfloat16) -> tuple[float | None, str]:
    """(peak FLOP/s, where the figure comes from) for MFU; (None, why) when no figure is known."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if dtype != torch.bfloat16:
            return None, f"no datasheet figure used for {dtype} (bf16 only)"
        for part, tflops in GPU_PEAK_BF16_TFLOPS:
            if part in name:
                return tflops * 1e12, f"datasheet, dense bf16, {part}: {tflops} TFLOP/s"
        return None, f"no datasheet figure for {name!r}"
    rate = measured_gemm_flops(device, dtype)
    return rate, f"measured: best {dtype} 2048×2048 GEMM rate on this machine, {rate / 1e9:.0f} GFLOP/s"


def measured_gemm_flops(device: torch.device, dtype: torch.dtype, size: int = 2048, repeats: int = 20) -> float:
    """The best FLOP/s of a size×size GEMM over `repeats` runs (after one warm-up; ~1 s on a 2-core CPU, so a
    moment of a shared machine's CPU going elsewhere does not halve the figure)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    best = float("inf")
    for i in range(repeats + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:  # the first is the warm-up
            best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best
