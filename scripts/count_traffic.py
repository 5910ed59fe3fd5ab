"""Memory traffic of a training step's non-GEMM work, counted on a CPU the way a GPU would run it.

    python scripts/count_traffic.py --preset DiT-XL/2 --kind ours-class diffusers-dit ours-text diffusers-pixart

On a GPU, much of a DiT training step is elementwise work (norms, modulation, activations, residuals, casts)
bound by memory bandwidth, not FLOPs. This counts it without a GPU, for the models of benchmark_compare.py:
a `TorchDispatchMode` sums the bytes that every operator other than the matmuls, convolutions and attention
kernels reads and writes in one forward + backward under bf16 autocast, and a saved-tensor hook sums the
storage kept for backward. Two things make the CPU run do what CUDA would: CUDA autocast's float32 policy for
`layer_norm` is installed as the CPU autocast kernel (CPU autocast keeps bf16), and latent-dit's attention
goes through `scaled_dot_product_attention`, as on a GPU (on a CPU in bf16 it is written out). Counted at two
batch sizes, each figure splits into a part per image (activations) and a fixed part (the weights' casts).
Writes OUT.json (default: runs/traffic/<preset>.json).
"""

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from benchmark_compare import KINDS, build, make_inputs
from latent_dit import model as model_module

REPO = Path(__file__).resolve().parent.parent
PRODUCTS = {"mm", "addmm", "bmm", "baddbmm", "convolution", "convolution_backward",
            "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention_for_cpu_backward"}
NO_DATA = {"_unsafe_view", "empty", "empty_strided", "empty_like"}  # allocate or reinterpret, move nothing


def layer_norm_in_float32(input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    """What CUDA autocast does with layer_norm: cast the inputs to float32 and return float32."""
    upcast = [None if t is None else t.float() for t in (input, weight, bias)]
    with torch.autocast("cpu", enabled=False):
        return torch.ops.aten.layer_norm(upcast[0], normalized_shape, upcast[1], upcast[2], eps, cudnn_enable)


def run_as_on_a_gpu() -> torch.library.Library:
    """Install CUDA's layer_norm policy in CPU autocast and route latent-dit's attention through SDPA, for this
    process. The override lasts as long as the returned library object."""
    library = torch.library.Library("aten", "IMPL")
    library.impl("layer_norm", layer_norm_in_float32, "AutocastCPU")
    model_module.attention = lambda q, k, v, mask=None: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return library


class CountBytes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func._schema.name.split("::")[1]
        if not func.is_view and name not in PRODUCTS and name not in NO_DATA:
            tensors = [t for t in tree_leaves((args, kwargs, out)) if isinstance(t, torch.Tensor)]
            self.total += sum(t.numel() * t.element_size() for t in tensors)
        return out


def count_step(kind: str, preset: str, latent_size: int, batch: int) -> tuple[int, int]:
    """(bytes moved by non-GEMM operators, bytes of storage saved for backward) in one forward + backward."""
    torch.manual_seed(0)
    model = build(kind, preset, latent_size).train()
    x, t, kwargs = make_inputs(kind, batch, latent_size, torch.device("cpu"), torch.bfloat16)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with CountBytes() as counter, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, timestep=t, return_dict=False, **kwargs)[0]
            loss = F.mse_loss(out[:, :4].float(), torch.zeros_like(x, dtype=torch.float32))
        loss.backward()
    return counter.total, sum(saved.values())


def per_image_and_fixed(at_small: int, at_large: int, small: int, large: int) -> tuple[float, float]:
    """Split a count taken at two batch sizes into its part per image and its part independent of the batch."""
    per_image = (at_large - at_small) / (large - small)
    return per_image, at_small - small * per_image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="DiT-XL/2")
    parser.add_argument("--kind", nargs="+", default=list(KINDS), choices=KINDS + ("ours-text-dit",))
    parser.add_argument("--latent-size", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs=2, default=[1, 2], help="Two batch sizes to split per image / fixed.")
    parser.add_argument("--at-batch", type=int, default=32, help="Also report the totals at this batch size.")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    out = Path(args.out) if args.out else REPO / "runs" / "traffic" / f"{args.preset.replace('/', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    library = run_as_on_a_gpu()  # kept to the end: the override lasts as long as this object

    small, large = args.batch_sizes
    results = {}
    print(f"| {args.preset}, {args.latent_size}² latents, bf16 | traffic GB per image | fixed GB | "
          f"saved GB per image | at batch {args.at_batch}: traffic GB, saved GB |\n| --- | --- | --- | --- | --- |")
    for kind in args.kind:
        (moved_s, saved_s), (moved_l, saved_l) = (count_step(kind, args.preset, args.latent_size, b) for b in (small, large))
        moved_per_image, fixed = per_image_and_fixed(moved_s, moved_l, small, large)
        saved_per_image, saved_fixed = per_image_and_fixed(saved_s, saved_l, small, large)
        results[kind] = {"traffic_per_image": moved_per_image, "traffic_fixed": fixed, "saved_per_image": saved_per_image,
                         "saved_fixed": saved_fixed}
        print(f"| {kind} | {moved_per_image / 1e9:.3f} | {fixed / 1e9:.2f} | {saved_per_image / 1e9:.3f} | "
              f"{(fixed + args.at_batch * moved_per_image) / 1e9:.1f}, {args.at_batch * saved_per_image / 1e9:.1f} |", flush=True)
        out.write_text(json.dumps({"preset": args.preset, "latent_size": args.latent_size, "results": results}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
