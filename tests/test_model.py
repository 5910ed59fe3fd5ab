"""LatentDiTTransformer2DModel: paper sizes, adaLN-Zero, conditioning modes, masks, position embeddings,
gradient checkpointing, dtypes, QK-norm and the diffusers save/load round trip."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from latent_dit import model as model_module
from latent_dit.model import PRESETS, LatentDiTTransformer2DModel, sincos_pos_embed_2d
from latent_dit.tiny import make_tiny_transformer

TINY = dict(sample_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=4, text_embed_dim=24)
TEXT_LEN = 5


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _perturbed(seed=0, **overrides):
    """A tiny model with every weight moved off its init (a fresh adaLN-Zero model outputs 0 whatever its input)."""
    return make_tiny_transformer(seed, **{**TINY, **overrides})


def _inputs(batch=2, height=8, width=8, channels=4, text_dim=24):
    return dict(
        hidden_states=_randn(batch, channels, height, width, seed=1),
        timestep=torch.tensor([10.0, 500.0][:batch] + [999.0] * max(0, batch - 2)),
        encoder_hidden_states=_randn(batch, TEXT_LEN, text_dim, seed=2),
        pooled_projections=_randn(batch, text_dim, seed=3),
    )


# --- sizes -----------------------------------------------------------------------------------------------

# DiT paper, Table 1 (class-conditional ImageNet 256: 32×32×4 latents, 1000 classes, learned sigma).
PAPER_PARAMS = {"S": 33e6, "B": 130e6, "L": 458e6, "XL": 675e6}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_parameter_count_matches_paper(name):
    with torch.device("meta"):  # no memory, no init cost: XL is as cheap as S
        model = LatentDiTTransformer2DModel.from_preset(
            name, conditioning="class", num_classes=1000, sample_size=32, in_channels=4, learn_sigma=True
        )
    size = name.split("-")[1].split("/")[0]
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PAPER_PARAMS[size]) / PAPER_PARAMS[size] < 0.01, f"{name}: {count / 1e6:.2f}M params"


def test_preset_sets_paper_hyperparameters_and_overrides():
    with torch.device("meta"):
        model = LatentDiTTransformer2DModel.from_preset("DiT-XL/2", conditioning="none", depth=3)
    assert (model.config.hidden_size, model.config.num_heads, model.config.patch_size) == (1152, 16, 2)
    assert model.config.depth == 3 and len(model.blocks) == 3
    with pytest.raises(ValueError, match="DiT-XXL/2"):
        LatentDiTTransformer2DModel.from_preset("DiT-XXL/2")


# --- adaLN-Zero and shapes -------------------------------------------------------------------------------


@pytest.mark.parametrize("conditioning", ["text", "class", "none"])
def test_fresh_model_outputs_exact_zeros(conditioning):
    model = LatentDiTTransformer2DModel(**TINY, conditioning=conditioning, num_classes=10)
    inputs = _inputs()
    if conditioning != "text":
        inputs.pop("encoder_hidden_states"), inputs.pop("pooled_projections")
    if conditioning == "class":
        inputs["class_labels"] = torch.tensor([3, 10])  # a real class and the null label
    out = model(**inputs).sample
    assert out.shape == (2, 4, 8, 8)
    assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("learn_sigma, out_channels", [(False, 4), (True, 8)])
@pytest.mark.parametrize("conditioning", ["text", "class", "none"])
def test_output_shape_per_mode(conditioning, learn_sigma, out_channels):
    model = _perturbed(conditioning=conditioning, learn_sigma=learn_sigma, num_classes=10)
    inputs = _inputs(batch=3)
    if conditioning != "text":
        inputs.pop("encoder_hidden_states"), inputs.pop("pooled_projections")
    if conditioning == "class":
        inputs["class_labels"] = torch.tensor([0, 9, 10])
    out = model(**inputs).sample
    assert model.out_channels == out_channels
    assert out.shape == (3, out_channels, 8, 8)
    assert out.abs().max() > 0
    (tuple_out,) = model(**inputs, return_dict=False)
    torch.testing.assert_close(tuple_out, out)


def test_scalar_timestep_broadcasts_like_a_vector():
    model = _perturbed()
    inputs = _inputs()
    vector = model(**{**inputs, "timestep": torch.tensor([250.0, 250.0])}).sample
    scalar = model(**{**inputs, "timestep": 250}).sample
    torch.testing.assert_close(scalar, vector)


def test_class_labels_change_the_output():
    model = _perturbed(conditioning="class", num_classes=10)
    x, t = _randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    a = model(x, t, class_labels=torch.tensor([1, 1])).sample
    b = model(x, t, class_labels=torch.tensor([1, 2])).sample
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-4


def test_missing_condition_raises():
    with pytest.raises(ValueError, match="class_labels"):
        _perturbed(conditioning="class", num_classes=10)(_randn(1, 4, 8, 8), 1)
    with pytest.raises(ValueError, match="encoder_hidden_states"):
        _perturbed()(_randn(1, 4, 8, 8), 1)


# --- text conditioning ------------------------------------------------------------------------------------


def test_padding_mask_is_honoured():
    model = _perturbed()
    inputs = _inputs()
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]])
    reference = model(**inputs, encoder_attention_mask=mask).sample

    changed_padding = inputs["encoder_hidden_states"].clone()
    changed_padding[0, 3:] = 100 * _randn(2, 24, seed=7)
    changed_padding[1, 4:] = -100.0
    out = model(**{**inputs, "encoder_hidden_states": changed_padding}, encoder_attention_mask=mask).sample
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-6)

    changed_token = inputs["encoder_hidden_states"].clone()
    changed_token[0, 1] = 3 * _randn(24, seed=8)
    out = model(**{**inputs, "encoder_hidden_states": changed_token}, encoder_attention_mask=mask).sample
    assert (out[0] - reference[0]).abs().max() > 1e-4  # a real token moved: the first image's output moves
    torch.testing.assert_close(out[1], reference[1])  # the other sample is untouched

    # Without a mask the padding tokens are attended to.
    unmasked = model(**{**inputs, "encoder_hidden_states": changed_padding}).sample
    assert (unmasked - reference).abs().max() > 1e-4


def test_pooled_projection_dim_can_differ_from_token_dim():
    model = _perturbed(pooled_embed_dim=16)
    inputs = {**_inputs(), "pooled_projections": _randn(2, 16)}
    assert model(**inputs).sample.shape == (2, 4, 8, 8)


# --- position embeddings ----------------------------------------------------------------------------------


def test_sincos_position_embedding_numbers():
    dim, base = 16, 4
    pos = sincos_pos_embed_2d(dim, base, base, base)  # the training grid: integer positions 0..3
    assert pos.shape == (base * base, dim)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    row, col = 2, 3
    expected = torch.cat([(row * omega).sin(), (row * omega).cos(), (col * omega).sin(), (col * omega).cos()]).float()
    torch.testing.assert_close(pos[row * base + col], expected)

    # A 2× larger grid interpolates: its even positions are exactly the training positions.
    big = sincos_pos_embed_2d(dim, 2 * base, 2 * base, base)
    torch.testing.assert_close(big[(2 * row) * (2 * base) + 2 * col], pos[row * base + col])


def test_training_grid_position_table_is_cached_and_other_grids_are_computed():
    model = _perturbed()
    grid = TINY["sample_size"] // TINY["patch_size"]
    torch.testing.assert_close(model.pos_embed, sincos_pos_embed_2d(TINY["hidden_size"], grid, grid, grid))
    assert model.position_embedding(grid, grid) is model.pos_embed  # no recomputation at the training size
    torch.testing.assert_close(model.position_embedding(2 * grid, grid), sincos_pos_embed_2d(TINY["hidden_size"], 2 * grid, grid, grid))
    assert "pos_embed" not in model.state_dict()  # fixed, so not saved: old checkpoints load unchanged
    assert model.to(torch.bfloat16).pos_embed.dtype == torch.bfloat16  # moves and casts with the model


@pytest.mark.parametrize("height, width", [(8, 8), (16, 16), (8, 16), (12, 4)])
def test_any_latent_size_runs(height, width):
    model = _perturbed()
    out = model(**_inputs(height=height, width=width)).sample
    assert out.shape == (2, 4, height, width)
    assert torch.isfinite(out).all()


def test_non_square_inputs_are_not_transposed():
    # A tall input must not be treated as a wide one: swapping H and W changes the position layout.
    model = _perturbed()
    inputs = _inputs(height=8, width=16)
    tall = model(**{**inputs, "hidden_states": inputs["hidden_states"].transpose(2, 3).contiguous()}).sample
    wide = model(**inputs).sample
    assert tall.shape == (2, 4, 16, 8) and wide.shape == (2, 4, 8, 16)
    assert (tall.transpose(2, 3) - wide).abs().max() > 1e-5


def test_size_not_divisible_by_patch_raises():
    with pytest.raises(ValueError, match=r"9×8 .*patch size 2"):
        _perturbed()(**_inputs(height=9, width=8))


def test_residual_stream_is_contiguous_in_every_block():
    # The patch embedding's (N, D, T) -> (N, T, D) transpose is a view; carried into the blocks, every residual
    # add and LayerNorm strides through it or copies it (a DiT-S/2 forward was 10% slower that way).
    model, layouts = _perturbed(), []
    for block in model.blocks:
        block.register_forward_pre_hook(lambda module, args: layouts.append(args[0].is_contiguous()))
    model(**_inputs(height=8, width=16))
    assert layouts == [True] * len(model.blocks)


@pytest.mark.parametrize("conditioning,adaln_single", [("text", True), ("text", False), ("class", False)])
def test_residual_stream_stays_bf16_under_autocast(conditioning, adaln_single):
    # adaLN-single adds each block's float32 table to the shared regressor's bf16 output; left at float32, that
    # sum turned every block's residual stream float32 under autocast (4-6% more training memory, more casts).
    model, dtypes = _perturbed(conditioning=conditioning, adaln_single=adaln_single), []
    for block in model.blocks:
        block.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype))
    inputs = _inputs() if conditioning == "text" else {**_inputs(), "class_labels": torch.tensor([1, 2])}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs).sample
    assert dtypes == [torch.bfloat16] * len(model.blocks)
    out.float().square().mean().backward()
    tables = [block.scale_shift_table for block in model.blocks] if adaln_single else []
    assert all(t.grad is not None and t.grad.dtype == torch.float32 and t.grad.abs().max() > 0 for t in tables)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # fused attention, and written out (CPU bf16)
def test_qkv_gradients_are_stacked_into_the_projection_layout_without_another_copy(dtype):
    # Unbinding q, k, v from a permuted (3, N, H, T, d) view made backward stack their gradients in that order
    # and then copy the stack once more into the projection's (N, T, 3D) layout: 6% of a DiT-XL/2 step's
    # elementwise memory traffic on a GPU (scripts/count_traffic.py).
    N, T, D = 2, 10, 32
    attn = model_module.Attention(D, num_heads=4).to(dtype)
    out = attn(_randn(N, T, D, seed=1).to(dtype).requires_grad_())
    writers = []

    class RecordQKVSizedOutputs(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor) and result.numel() == N * T * 3 * D and not func.is_view:
                writers.append(func.__name__.split(".")[0])
            return result

    with RecordQKVSizedOutputs():
        out.float().square().sum().backward()
    assert writers == ["stack"]


@pytest.mark.parametrize("cross_attention_norm", [False, True])
def test_layer_norms_run_outside_autocast_in_the_stream_dtype(monkeypatch, cross_attention_norm):
    # CUDA autocast upcasts layer_norm to float32 (and returns float32): every norm -> modulate -> linear then
    # moved its activations at twice the width and cast them back. The model's norms run with autocast off on
    # the bf16 stream (their affine weights cast to it), so no device's autocast policy applies to them.
    calls, layer_norm = [], F.layer_norm

    def recording_layer_norm(x, shape, weight=None, bias=None, eps=1e-5):
        calls.append((torch.is_autocast_enabled("cpu"), x.dtype, None if weight is None else weight.dtype))
        return layer_norm(x, shape, weight, bias, eps)

    monkeypatch.setattr(F, "layer_norm", recording_layer_norm)
    model = _perturbed(cross_attention_norm=cross_attention_norm)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(**_inputs()).sample.float().mean().backward()
    per_block = 3 if cross_attention_norm else 2
    assert len(calls) == per_block * len(model.blocks) + 1
    weights = {torch.bfloat16} if cross_attention_norm else set()
    assert {enabled for enabled, _, _ in calls} == {False} and {dtype for _, dtype, _ in calls} == {torch.bfloat16}
    assert {w for _, _, w in calls} - {None} == weights
    assert all(block.norm_cross.weight.grad.dtype == torch.float32 for block in model.blocks if cross_attention_norm)

    # Outside autocast it is nn.LayerNorm, exactly.
    norm, reference = model_module.LayerNorm(16, eps=1e-6), nn.LayerNorm(16, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_(), norm.bias.normal_()
    reference.load_state_dict(norm.state_dict())
    x = _randn(2, 5, 16)
    assert torch.equal(norm(x), reference(x))


# --- training features and dtypes -------------------------------------------------------------------------


def test_adaln_single_shares_one_regressor_and_starts_as_identity():
    per_block, single = LatentDiTTransformer2DModel(**TINY), LatentDiTTransformer2DModel(**TINY, adaln_single=True)
    D, depth = TINY["hidden_size"], TINY["depth"]
    regressor = D * 6 * D + 6 * D  # one SiLU -> Linear(D, 6D)
    count = lambda m: sum(p.numel() for p in m.parameters())
    # depth regressors become one shared regressor plus a 6D table per block.
    assert count(per_block) - count(single) == depth * regressor - regressor - depth * 6 * D
    assert all(block.adaLN_modulation is None and block.scale_shift_table.shape == (6 * D,) for block in single.blocks)

    # adaLN-Zero still holds: every block of a fresh model is the identity, and the output is 0.
    x, c6, context = _randn(2, 16, D, seed=4), single.shared_modulation(_randn(2, D, seed=5)), _randn(2, TEXT_LEN, D, seed=6)
    for block in single.blocks:
        torch.testing.assert_close(block(x, c6, context), x)
    assert torch.count_nonzero(single(**_inputs()).sample) == 0

    # Every parameter learns (the zeroed tables and regressor included), with gradient checkpointing too.
    model = _perturbed(adaln_single=True)
    model.enable_gradient_checkpointing()
    model.train()
    model(**_inputs()).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in model.parameters())


def test_without_cross_attention_norm_queries_come_from_the_residual_stream():
    normed, plain = _perturbed(), _perturbed(cross_attention_norm=False)
    D, depth = TINY["hidden_size"], TINY["depth"]
    count = lambda m: sum(p.numel() for p in m.parameters())
    assert count(normed) - count(plain) == depth * 2 * D  # one affine LayerNorm per block fewer
    assert all(isinstance(block.norm_cross, torch.nn.Identity) for block in plain.blocks)

    # Same weights otherwise: the block's cross-attention now sees x itself, so the outputs differ.
    plain.load_state_dict({k: v for k, v in normed.state_dict().items() if "norm_cross" not in k})
    block, x, c, context = plain.blocks[0], _randn(2, 16, D, seed=4), _randn(2, D, seed=5), _randn(2, TEXT_LEN, D, seed=6)
    expected = x + block.cross_attn(x, context)
    # The block's forward with its self-attention and MLP branches switched off (zero gates) leaves the cross branch.
    block.adaLN_modulation[1].weight.data.zero_()
    block.adaLN_modulation[1].bias.data.zero_()
    torch.testing.assert_close(block(x, c, context), expected)
    assert not torch.allclose(plain(**_inputs()).sample, normed(**_inputs()).sample)

    plain = _perturbed(cross_attention_norm=False).train()
    plain(**_inputs()).sample.square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in plain.parameters())


def test_gradient_checkpointing_gives_the_same_gradients():
    inputs = _inputs()

    def grads(model):
        model.train()
        model(**inputs).sample.square().mean().backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    plain = grads(_perturbed())
    model = _perturbed()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads(model)
    assert plain.keys() == checkpointed.keys() and len(plain) == len(list(model.parameters()))
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)
    assert any(g.abs().max() > 0 for g in plain.values())


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 0.03), (torch.float16, 0.005)])
def test_low_precision_forward_is_close_to_float32(dtype, tolerance):
    model = _perturbed()
    inputs = _inputs()
    reference = model(**inputs).sample
    out = model.to(dtype)(**{k: v.to(dtype) for k, v in inputs.items()}).sample
    assert out.dtype == dtype
    assert torch.isfinite(out).all()
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < tolerance, f"{dtype}: relative error {error:.4f}"


def test_bf16_attention_on_cpu_is_written_out_and_matches_float32(monkeypatch):
    """PyTorch's fused CPU attention kernels are slower than three bf16 GEMM-based steps (docs/benchmarks.md),
    so bf16 on a CPU does not call `scaled_dot_product_attention` up to 256×256 query-key pairs; the result
    still matches float32, with and without a padding mask, and padded keys get no weight."""
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *a, **k: calls.append(q.dtype) or sdpa(q, *a, **k))
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 16, 8, generator=g) for _ in range(3))
    mask = torch.ones(2, 1, 1, 16, dtype=torch.bool)
    mask[0, ..., 5:] = False  # first sample: 5 real keys, 11 padding
    for m in (None, mask):
        expected = sdpa(q, k, v, attn_mask=m)
        out = model_module.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), m)
        assert out.dtype == torch.bfloat16
        assert (out.float() - expected).abs().max() < 0.05
    v_changed = v.clone()
    v_changed[0, :, 5:] = 100.0  # values at padded positions must not leak into the output
    out = model_module.attention(q.bfloat16(), k.bfloat16(), v_changed.bfloat16(), mask)
    assert torch.equal(out[0], model_module.attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)[0])
    assert not calls  # the float32 references above called PyTorch's function directly

    model = _perturbed()
    inputs = _inputs()
    reference = model(**inputs).sample
    assert calls  # float32: the fused kernel
    calls.clear()
    with torch.autocast("cpu", torch.bfloat16):
        out = model(**inputs).sample
    assert not calls  # the model under bf16 autocast took the written-out path in every block
    error = (out.float() - reference).abs().max() / reference.abs().max()
    assert error < 0.03, f"relative error {error:.4f}"

    # Above 256×256 query-key pairs the fused kernel is the faster one, in bf16 (no float32 copies of q, k, v).
    long = torch.randn(1, 2, 257, 8, generator=g)
    out = model_module.attention(long.bfloat16(), long.bfloat16(), long.bfloat16())
    assert calls == [torch.bfloat16] and out.dtype == torch.bfloat16
    assert (out.float() - sdpa(long, long, long)).abs().max() < 0.05


def _saved_tensors(fn, *args):
    """fn(*args) and the shapes and dtypes autograd keeps for its backward."""
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(*args)
    return out, saved


def test_written_out_attention_keeps_no_weights_and_has_exact_gradients():
    g = torch.Generator().manual_seed(0)
    N, H, T, L, d = 2, 3, 6, 5, 4
    q, k, v = (torch.randn(N, H, n, d, generator=g, dtype=torch.float64, requires_grad=True) for n in (T, L, L))
    mask = torch.ones(N, 1, 1, L, dtype=torch.bool)
    mask[0, ..., 3:] = False
    for m in (None, mask):
        torch.autograd.gradcheck(model_module.WrittenOutAttention.apply, (q, k, v, m))
        expected = F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        torch.testing.assert_close(model_module.WrittenOutAttention.apply(q, k, v, m), expected)

    # In bf16 on a CPU (where the model uses it): only q, k, v (and the mask) wait for backward, no (T, L) weights.
    qb, kb, vb = (t.detach().bfloat16().requires_grad_() for t in (q, k, v))
    out, saved = _saved_tensors(model_module.attention, qb, kb, vb, mask)
    assert sorted(saved) == sorted([((N, H, T, d), torch.bfloat16), ((N, H, L, d), torch.bfloat16),
                                    ((N, H, L, d), torch.bfloat16), ((N, 1, 1, L), torch.bool)])
    out.float().square().sum().backward()
    reference = [x.detach().float().requires_grad_() for x in (qb, kb, vb)]
    F.scaled_dot_product_attention(*reference, attn_mask=mask).square().sum().backward()
    for ours, theirs in zip((qb, kb, vb), reference):
        assert (ours.grad.float() - theirs.grad).abs().max() < 0.05 * theirs.grad.abs().max()


def test_qk_norm_makes_attention_invariant_to_query_scale():
    for use_qk_norm, should_change in ((True, False), (False, True)):
        model = _perturbed(use_qk_norm=use_qk_norm)
        inputs = _inputs()
        reference = model(**inputs).sample
        with torch.no_grad():
            dim = TINY["hidden_size"]
            for block in model.blocks:  # scale the queries of every self-attention by 10
                block.attn.to_qkv.weight[:dim] *= 10
                block.attn.to_qkv.bias[:dim] *= 10
        out = model(**inputs).sample
        changed = (out - reference).abs().max() > 1e-4 * reference.abs().max()
        assert changed == should_change, f"use_qk_norm={use_qk_norm}"
    assert isinstance(model.blocks[0].attn.norm_q, torch.nn.Identity)
    assert isinstance(_perturbed(use_qk_norm=True).blocks[0].attn.norm_q, torch.nn.RMSNorm)


# --- configuration and serialization ----------------------------------------------------------------------


def test_save_pretrained_round_trip(tmp_path):
    model = _perturbed(learn_sigma=True, prediction_type="v_prediction", use_qk_norm=True, adaln_single=True,
                       cross_attention_norm=False)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file()
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["_class_name"] == "LatentDiTTransformer2DModel"
    assert (config["hidden_size"], config["learn_sigma"], config["prediction_type"]) == (32, True, "v_prediction")

    loaded = LatentDiTTransformer2DModel.from_pretrained(tmp_path)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for name in state:
        assert torch.equal(state[name], loaded_state[name]), name
    inputs = _inputs()
    assert torch.equal(loaded(**inputs).sample, model(**inputs).sample)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"conditioning": "audio"}, "conditioning='audio'"),
        ({"prediction_type": "sample"}, "prediction_type='sample'"),
        ({"hidden_size": 30, "num_heads": 4}, "hidden_size=30"),
    ],
)
def test_bad_config_raises(overrides, message):
    with pytest.raises(ValueError, match=message):
        LatentDiTTransformer2DModel(**{**TINY, **overrides})
