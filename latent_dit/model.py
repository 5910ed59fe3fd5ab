"""The DiT network: a transformer that denoises latents, conditioned on text, a class label, or nothing.

Read top to bottom: position and timestep embeddings, the conditioning embedders, attention, the
adaLN-Zero block, the final layer, then `LatentDiTTransformer2DModel`, which patchifies the latents,
runs the blocks and unpatchifies. Sizes follow Peebles & Xie, "Scalable Diffusion Models with
Transformers" (2023), Table 1; text conditioning uses cross-attention as in PixArt-α (Chen et al. 2023).

The network only predicts. Noising, targets and loss weighting live in `objective.py`; sampling is
the diffusers scheduler's job.
"""

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

# DiT paper, Table 1: depth, hidden size, heads. Patch size is the number after the slash.
_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
PRESETS = {
    f"DiT-{size}/{patch}": {"depth": depth, "hidden_size": width, "num_heads": heads, "patch_size": patch}
    for size, (depth, width, heads) in _SIZES.items()
    for patch in (2, 4, 8)
}

CONDITIONING_MODES = ("text", "class", "none")
PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")


def sincos_pos_embed_2d(dim: int, height: int, width: int, base_size: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings for a height × width token grid, shape (height*width, dim).

    Half the channels encode the row, half the column (DiT/MAE). Positions are scaled so a grid with
    as many tokens as the training grid (base_size²) spans 0..base_size whatever its aspect ratio:
    larger or non-square grids interpolate between trained positions instead of extrapolating.
    """
    scale = base_size / math.sqrt(height * width)
    rows = torch.arange(height, dtype=torch.float64) * scale
    cols = torch.arange(width, dtype=torch.float64) * scale
    grid_rows, grid_cols = torch.meshgrid(rows, cols, indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))

    def embed_1d(pos):
        angles = pos.reshape(-1, 1) * omega  # (T, dim/4)
        return torch.cat([angles.sin(), angles.cos()], dim=1)  # (T, dim/2)

    return torch.cat([embed_1d(grid_rows), embed_1d(grid_cols)], dim=1).float()  # (T, dim)


class TimestepEmbedder(nn.Module):
    """Scalar diffusion timesteps (0..1000, fractional allowed) -> vectors, via sinusoids and an MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    @staticmethod
    def sinusoidal(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        # Transformer position encoding applied to time (Vaswani et al. 2017; GLIDE's timestep_embedding).
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t.float()[:, None] * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.sinusoidal(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Row `num_classes` is the "null" label used for classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class TextEmbedder(nn.Module):
    """Text-encoder outputs -> the model width: per-token states for cross-attention, pooled vector for adaLN."""

    def __init__(self, text_embed_dim: int, pooled_embed_dim: int, hidden_size: int):
        super().__init__()
        # A two-layer MLP on the tokens, as PixArt's caption projection.
        self.token_proj = nn.Sequential(
            nn.Linear(text_embed_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size)
        )
        self.pooled_proj = nn.Sequential(nn.SiLU(), nn.Linear(pooled_embed_dim, hidden_size))

    def forward(self, tokens: torch.Tensor, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.token_proj(tokens), self.pooled_proj(pooled)


class WrittenOutAttention(torch.autograd.Function):
    """softmax(q·kᵀ/√d + mask)·v as two batched GEMMs and a softmax, as in the DiT reference's attention.

    Autograd through these three steps would keep every block's (T, L) softmax weights until backward. Like a
    fused kernel, this keeps only q, k and v, and recomputes the weights in backward (one more GEMM and
    softmax there): 6-8% less peak training memory at DiT-S/2 (docs/benchmarks.md).
    """

    @staticmethod
    def weights(q, k, mask):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)  # (N, H, T, L)
        if mask is not None:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        return scores.softmax(dim=-1)

    @staticmethod
    def forward(ctx, q, k, v, mask):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()  # once, for both passes' GEMMs
        ctx.save_for_backward(q, k, v, mask)
        return WrittenOutAttention.weights(q, k, mask) @ v

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, mask = ctx.saved_tensors
        weights = WrittenOutAttention.weights(q, k, mask)
        grad_v = weights.transpose(-1, -2) @ grad_out
        # Softmax backward, dS = P ∘ (dP − rowsum(P ∘ dP)), in PyTorch's fused kernel.
        grad_scores = torch._softmax_backward_data(grad_out @ v.transpose(-1, -2), weights, -1, weights.dtype)
        scale = q.shape[-1] ** -0.5
        return (grad_scores @ k) * scale, (grad_scores.transpose(-1, -2) @ q) * scale, grad_v, None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask=None) -> torch.Tensor:
    """softmax(q·kᵀ/√d + mask)·v for (N, H, T, d) tensors; `mask` is boolean, True = attend.

    PyTorch's fused `scaled_dot_product_attention` (flash on a GPU), except for short sequences in bf16 on a
    CPU. There, up to 256×256 query-key pairs, the fused kernels reach ~150 GFLOP/s while bf16 batched GEMMs
    reach several times that, so the steps are written out (`WrittenOutAttention`): forward + backward at
    DiT-S/2 size in 6-7 ms instead of 11-12. Longer sequences run faster fused (docs/benchmarks.md).
    """
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and q.shape[-2] * k.shape[-2] <= 256 * 256:
        return WrittenOutAttention.apply(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class Attention(nn.Module):
    """Multi-head attention through `scaled_dot_product_attention`.

    Self-attention when `context` is None, cross-attention to `context` otherwise. Q, K and V come
    from one fused projection for self-attention (one GEMM instead of three), K and V from one for
    cross-attention. Optional RMSNorm on queries and keys (QK-norm) keeps attention logits bounded.
    """

    def __init__(self, dim: int, num_heads: int, cross: bool = False, use_qk_norm: bool = False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.cross = cross
        if cross:
            self.to_q = nn.Linear(dim, dim)
            self.to_kv = nn.Linear(dim, 2 * dim)
        else:
            self.to_qkv = nn.Linear(dim, 3 * dim)
        self.norm_q = nn.RMSNorm(self.head_dim, eps=1e-6) if use_qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(self.head_dim, eps=1e-6) if use_qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context=None, mask=None) -> torch.Tensor:
        N, T, D = x.shape
        # Heads are split as views: (N, T, 3, H, d) unbound on dim 2, each (N, T, H, d) -> (N, H, T, d). Backward
        # stacks the three gradients straight into the projection's (N, T, 3D) layout (unbinding a permuted
        # (3, N, H, T, d) instead stacks them in that order, then copies once more to get back).
        if self.cross:
            q = self.to_q(x).view(N, T, self.num_heads, self.head_dim).transpose(1, 2)
            k, v = (t.transpose(1, 2) for t in self.to_kv(context).view(N, -1, 2, self.num_heads, self.head_dim).unbind(2))
        else:
            q, k, v = (t.transpose(1, 2) for t in self.to_qkv(x).view(N, T, 3, self.num_heads, self.head_dim).unbind(2))
        q, k = self.norm_q(q), self.norm_k(k)
        x = attention(q, k, v, mask)  # (N, H, T, d)
        return self.proj(x.transpose(1, 2).reshape(N, T, D))


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` whose output keeps its input's dtype under autocast: bf16 in mixed precision.

    CUDA autocast runs layer_norm in float32 and returns float32, so each norm -> modulate -> linear of a
    block would write and re-read its activations at twice the width, keep float32 copies of them for
    backward, and cast them back to bf16 for the next GEMM. Run as it is, the kernel still accumulates its
    mean and variance in float32. CPU autocast already keeps the input's dtype, so on a CPU nothing changes.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning, plus cross-attention to text tokens in text mode.

    The conditioning vector c regresses a shift, scale and gate for the self-attention and MLP
    branches (DiT §3.2). The cross-attention branch sits between them, unmodulated, as in PixArt-α.
    With `adaln_single` (PixArt-α's adaLN-single) the block has no regressor of its own: it receives the
    six vectors from one regressor shared by all blocks, and adds its own learned table to them. Without
    `cross_attention_norm` the queries of the cross-attention come from the residual stream as it is, as in
    PixArt-α, instead of through a LayerNorm.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, use_cross_attention: bool, use_qk_norm: bool,
                 adaln_single: bool = False, cross_attention_norm: bool = True):
        super().__init__()
        self.norm1 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads, use_qk_norm=use_qk_norm)
        if use_cross_attention:
            self.norm_cross = LayerNorm(hidden_size, eps=1e-6) if cross_attention_norm else nn.Identity()
            self.cross_attn = Attention(hidden_size, num_heads, cross=True, use_qk_norm=use_qk_norm)
        else:
            self.cross_attn = None
        self.norm2 = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(), nn.Linear(mlp_hidden, hidden_size)
        )
        if adaln_single:
            self.adaLN_modulation = None
            self.scale_shift_table = nn.Parameter(torch.zeros(6 * hidden_size))
        else:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, context=None, context_mask=None):
        # c: (N, D), or with adaLN-single the shared regressor's (N, 6D) output. The table is cast to that
        # output's dtype: under bf16 autocast a float32 sum would turn the whole residual stream float32.
        modulation = (self.adaLN_modulation(c) if self.adaLN_modulation is not None
                      else c + self.scale_shift_table.to(c.dtype))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation.chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(self.norm_cross(x), context, context_mask)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm and a linear map from each token to its p×p×C patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LatentDiTTransformer2DModel(ModelMixin, ConfigMixin):
    """Diffusion transformer over latents (or pixels), conditioned on text, a class label, or nothing.

    `conditioning` picks the mode: "text" (cross-attention to text-encoder tokens + pooled text in
    adaLN), "class" (label embedding with a null label, as in the DiT paper) or "none".
    `prediction_type` records what the network is trained to output ("epsilon", "v_prediction", or
    "flow" for rectified-flow velocity); the pipeline checks that its scheduler agrees.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["DiTBlock"]
    # `model.compile_repeated_blocks()` (diffusers' regional compilation) compiles one block and reuses the code
    # for all of them: a fraction of a whole-model compile (DiT-S/2 training on a CPU: 20 s instead of 56 s).
    _repeated_blocks = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,  # latent height/width the model is trained at; sets the position-embedding scale
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        conditioning: str = "text",
        text_embed_dim: int = 512,  # width of the text encoder's token states
        pooled_embed_dim: int | None = None,  # width of its pooled vector; defaults to text_embed_dim
        num_classes: int = 1000,
        learn_sigma: bool = False,  # also output a variance interpolation (DiT/IDDPM); doubles out channels
        prediction_type: str = "epsilon",
        use_qk_norm: bool = False,
        frequency_embedding_size: int = 256,
        adaln_single: bool = False,  # one modulation regressor shared by all blocks (PixArt-α) instead of one per block
        cross_attention_norm: bool = True,  # LayerNorm before cross-attention (PixArt-α has none)
    ):
        super().__init__()
        if conditioning not in CONDITIONING_MODES:
            raise ValueError(f"conditioning={conditioning!r}; choose one of {CONDITIONING_MODES}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r}; choose one of {PREDICTION_TYPES}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 2 or hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by 4 and by num_heads={num_heads} (even head dim)")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.gradient_checkpointing = False

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)
        # The training grid's position table, computed once and moved with the model (not saved: it is fixed).
        grid = sample_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed_2d(hidden_size, grid, grid, grid), persistent=False)
        self.t_embedder = TimestepEmbedder(hidden_size, frequency_embedding_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if conditioning == "class" else None
        self.text_embedder = (
            TextEmbedder(text_embed_dim, pooled_embed_dim or text_embed_dim, hidden_size) if conditioning == "text" else None
        )
        self.shared_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size)) if adaln_single else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, conditioning == "text", use_qk_norm, adaln_single, cross_attention_norm)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "LatentDiTTransformer2DModel":
        """Build a paper-sized model, e.g. `from_preset("DiT-XL/2", conditioning="class", learn_sigma=True)`."""
        if name not in PRESETS:
            raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def initialize_weights(self):
        # Transformer linears: Xavier-uniform weights, zero biases (ViT/DiT reference).
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        # Patch embedding: Xavier on the conv viewed as a linear map, like a ViT patch projection.
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        # Timestep MLP: N(0, 0.02) as in the DiT reference.
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # Label table: N(0, 0.02).
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # Cross-attention output projections start at zero so text mode also begins as the identity.
        for block in self.blocks:
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
        # adaLN-Zero: zero the modulation regressors so every residual gate is 0 and each block starts as
        # the identity; this is what made DiT train stably (paper §3.2, Fig. 5).
        # With adaLN-single the shared regressor is zeroed instead (the blocks' tables start at zero).
        for regressor in [block.adaLN_modulation for block in self.blocks] + [self.shared_modulation]:
            if regressor is not None:
                nn.init.zeros_(regressor[-1].weight)
                nn.init.zeros_(regressor[-1].bias)
        # Final layer outputs zero at init, so the first prediction is 0 for any input.
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """(N, T, p*p*C) -> (N, C, H, W), the inverse of the patch embedding's layout."""
        p, c = self.config.patch_size, self.out_channels
        h, w = height // p, width // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """(height*width, D) position embeddings for a token grid: the cached table at the training size."""
        base = self.config.sample_size // self.config.patch_size
        if (height, width) == (base, base):
            return self.pos_embed
        return sincos_pos_embed_2d(self.config.hidden_size, height, width, base).to(self.pos_embed.device)

    def condition(self, timestep, class_labels=None) -> torch.Tensor:
        """The timestep (+ class) part of the vector c that drives adaLN; text mode adds the pooled prompt."""
        c = self.t_embedder(timestep)  # (N, D)
        if self.y_embedder is not None:
            if class_labels is None:
                raise ValueError("This model is class-conditional: pass class_labels (use num_classes for 'no class').")
            c = c + self.y_embedder(class_labels)
        return c

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
        return_dict: bool = True,
    ):
        """Predict the objective's target for noisy `hidden_states` (N, C, H, W) at `timestep` (N,) or scalar.

        Text mode needs `encoder_hidden_states` (N, L, text_embed_dim); `encoder_attention_mask` (N, L)
        marks real tokens with 1 and padding with 0; `pooled_projections` (N, pooled_embed_dim) is
        the pooled prompt. Class mode needs `class_labels` (N,).
        """
        N, _, H, W = hidden_states.shape
        p = self.config.patch_size
        if H % p or W % p:
            raise ValueError(f"Latent size {H}×{W} is not divisible by the patch size {p}.")
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(N)

        # (N, T, D), T = H*W/p². Made contiguous once here: left as the conv's transposed view, every residual
        # add and LayerNorm of the blocks would inherit that layout and copy or stride through it.
        x = self.x_embedder(hidden_states).flatten(2).transpose(1, 2).contiguous()
        x = x + self.position_embedding(H // p, W // p).to(x.dtype)
        c = self.condition(timestep, class_labels=class_labels)  # (N, D)

        context, mask = None, None
        if self.text_embedder is not None:
            if encoder_hidden_states is None or pooled_projections is None:
                raise ValueError("This model is text-conditioned: pass encoder_hidden_states and pooled_projections.")
            context, pooled = self.text_embedder(encoder_hidden_states.to(x.dtype), pooled_projections.to(x.dtype))
            c = c + pooled  # (N, D)
            if encoder_attention_mask is not None:
                mask = encoder_attention_mask.bool()[:, None, None, :]  # (N, 1, 1, L), True = attend

        block_c = self.shared_modulation(c) if self.shared_modulation is not None else c  # (N, 6D) or (N, D)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x, block_c, context, mask)
            else:
                x = block(x, block_c, context, mask)  # (N, T, D)
        x = self.final_layer(x, c)  # (N, T, p*p*C_out)
        output = self.unpatchify(x, H, W)  # (N, C_out, H, W)
        if not return_dict:
            return (output,)
        return Transformer2DModelOutput(sample=output)
