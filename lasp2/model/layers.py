"""Llama 3 building blocks and the linear-attention token mixers of Linear-Llama3.

Attention layers take this rank's hidden states [B, C, hidden], the global positions of its
tokens [C] and an attention context `ctx` with `linear_attn(q, k, v, log_decay, causal, scale)`,
`softmax_attn(q, k, v, causal, scale)`, `delta_rule(q, k, v, beta, log_decay, scale)` and
`causal_conv1d(x, weight, bias, activation)` (a `lasp2.parallel.SequenceParallel`, or
`LocalAttention` on one device); they never talk to other ranks themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops.checks import compute_dtype
from ..ops.feature_maps import rebased_feature_map, taylor_feature_map
from .config import DELTA_KINDS, ModelConfig

# GLA's gate temperature: log decay = logsigmoid(gate) / 16 keeps gates near 1 at init.
GATE_TEMPERATURE = 16.0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, hidden: int, ffn: int):
        super().__init__()
        self.gate = nn.Linear(hidden, ffn, bias=False)
        self.up = nn.Linear(hidden, ffn, bias=False)
        self.down = nn.Linear(ffn, hidden, bias=False)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half convention) of x [B, C, H, D] at global positions [C]."""
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # [C, D/2]
    cos, sin = (torch.cat([f, f], dim=-1)[None, :, None, :] for f in (angles.cos(), angles.sin()))
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.float() * cos + rotated * sin).to(x.dtype)


class SoftmaxAttention(nn.Module):
    """Llama 3 attention: GQA, RoPE (theta 500000) on q and k, no biases."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, hkv, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        self.heads, self.kv_heads, self.head_dim, self.theta = h, hkv, d, cfg.rope_theta
        self.q = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.k = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.v = nn.Linear(cfg.hidden_size, hkv * d, bias=False)
        self.o = nn.Linear(h * d, cfg.hidden_size, bias=False)

    def forward(self, x, positions, ctx):
        b, c, _ = x.shape
        q = apply_rope(self.q(x).view(b, c, self.heads, self.head_dim), positions, self.theta)
        k = apply_rope(self.k(x).view(b, c, self.kv_heads, self.head_dim), positions, self.theta)
        v = self.v(x).view(b, c, self.kv_heads, self.head_dim)
        o = ctx.softmax_attn(q, k, v, causal=True, scale=self.head_dim**-0.5)
        return self.o(o.reshape(b, c, -1))


def lightning_log_decay(num_heads: int) -> torch.Tensor:
    """ALiBi slopes as decay rates: log lambda_h = -2^(-8 (h+1) / H)."""
    return -torch.pow(2.0, -8.0 * torch.arange(1, num_heads + 1) / num_heads)


def retention_log_decay(num_heads: int) -> torch.Tensor:
    """RetNet's gammas: log(1 - 2^(-5-h))."""
    return torch.log1p(-torch.pow(2.0, -5.0 - torch.arange(num_heads, dtype=torch.float64))).float()


class LinearAttention(nn.Module):
    """Linear-attention token mixer; every kind computes o = ctx.linear_attn(phi(q), phi(k), v, g),
    then RMSNorm per head, times silu(gate(x)), then the output projection:

        basic:      S_t = S_{t-1} + k_t^T v_t,                 phi = identity
        lightning:  S_t = lambda_h S_{t-1} + k_t^T v_t,        lambda_h = exp(-2^(-8(h+1)/H)) (fixed)
        retention:  S_t = gamma_h S_{t-1} + k_t^T v_t,         gamma_h = 1 - 2^(-5-h) (fixed)
        simple_gla: S_t = a_t S_{t-1} + k_t^T v_t,             a_t = sigmoid(w_h . x_t)^(1/16) per head
        gla:        S_t = diag(a_t) S_{t-1} + k_t^T v_t,       a_t = sigmoid(W2 W1 x_t)^(1/16) per key channel
        based:      S_t = S_{t-1} + phi(k_t)^T v_t,            phi = 2nd-order Taylor map of 16-dim q, k
        rebased:    S_t = S_{t-1} + phi(k_t)^T v_t,            phi(x) = (w * norm(x) + b)^2 on 16-dim q, k
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, d = cfg.num_heads, cfg.dim_per_head
        self.kind, self.heads, self.head_dim = cfg.linear_kind, h, d
        self.key_dim = cfg.feature_dim if self.kind in ("based", "rebased") else d
        self.q = nn.Linear(cfg.hidden_size, h * self.key_dim, bias=False)
        self.k = nn.Linear(cfg.hidden_size, h * self.key_dim, bias=False)
        self.v = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.gate = nn.Linear(cfg.hidden_size, h * d, bias=False)
        self.o = nn.Linear(h * d, cfg.hidden_size, bias=False)
        self.head_norm = RMSNorm(d, cfg.norm_eps)
        if self.kind == "lightning":
            self.register_buffer("log_decay", lightning_log_decay(h), persistent=False)
        elif self.kind == "retention":
            self.register_buffer("log_decay", retention_log_decay(h), persistent=False)
        elif self.kind == "simple_gla":
            self.decay_gate = nn.Linear(cfg.hidden_size, h, bias=True)
        elif self.kind == "gla":
            self.decay_gate = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.gate_rank, bias=False),
                                            nn.Linear(cfg.gate_rank, h * self.key_dim, bias=True))
        elif self.kind == "rebased":
            self.feature_weight = nn.Parameter(torch.ones(h, self.key_dim))
            self.feature_bias = nn.Parameter(torch.zeros(h, self.key_dim))

    def features(self, x):
        if self.kind == "based":
            return taylor_feature_map(x)
        if self.kind == "rebased":
            return rebased_feature_map(x, self.feature_weight, self.feature_bias).to(x.dtype)  # fp32 gains: keep x's
        return x

    def log_decay_of(self, x):
        if self.kind in ("lightning", "retention"):
            return self.log_decay
        if self.kind == "simple_gla":
            return F.logsigmoid(self.decay_gate(x).float()) / GATE_TEMPERATURE
        if self.kind == "gla":
            b, c, _ = x.shape
            return F.logsigmoid(self.decay_gate(x).float()).view(b, c, self.heads, self.key_dim) / GATE_TEMPERATURE
        return None

    def forward(self, x, positions, ctx):
        b, c, _ = x.shape
        q = self.features(self.q(x).view(b, c, self.heads, self.key_dim))
        k = self.features(self.k(x).view(b, c, self.heads, self.key_dim))
        v = self.v(x).view(b, c, self.heads, self.head_dim)
        o = ctx.linear_attn(q, k, v, self.log_decay_of(x), causal=True, scale=1.0 / math.sqrt(q.shape[-1]))
        o = self.head_norm(o) * F.silu(self.gate(x)).view(b, c, self.heads, self.head_dim)
        return self.o(o.reshape(b, c, -1))


class DeltaRuleAttention(nn.Module):
    """The delta-rule token mixers, built as the published layers are:

        q, k, v = conv(Wq x, Wk x, Wv x)            short causal depthwise convolution + SiLU
        q, k    = q / |q|, k / |k| per head          (L2 norm), scale K^-1/2
        beta    = sigmoid(Wb x)                     (x2 with allow_neg_eigval)
        deltanet:        no gate
        gated_deltanet:  g = -exp(A_log) * softplus(Wa x + dt_bias)           per value head
        kda:             g = -exp(A_log) * softplus(Wf2 Wf1 x + dt_bias)       per key channel
        o = ctx.delta_rule(q, k, v, beta, g); RMSNorm per head, times silu(Wz x) (deltanet,
            gated_deltanet) or sigmoid(Wg2 Wg1 x) (kda), then the output projection.

    q and k have num_heads heads, v num_value_heads (grouped values); K = V = dim_per_head.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hk, hv, d = cfg.num_heads, cfg.value_heads, cfg.dim_per_head
        self.kind, self.key_heads, self.value_heads, self.head_dim = cfg.linear_kind, hk, hv, d
        self.beta_max = 2.0 if cfg.allow_neg_eigval else 1.0
        self.q = nn.Linear(cfg.hidden_size, hk * d, bias=False)
        self.k = nn.Linear(cfg.hidden_size, hk * d, bias=False)
        self.v = nn.Linear(cfg.hidden_size, hv * d, bias=False)
        self.conv = nn.Parameter(torch.empty((2 * hk + hv) * d, cfg.conv_size).uniform_(-1, 1) / cfg.conv_size**0.5)
        self.beta = nn.Linear(cfg.hidden_size, hv, bias=False)
        self.o = nn.Linear(hv * d, cfg.hidden_size, bias=False)
        self.head_norm = RMSNorm(d, cfg.norm_eps)
        if self.kind == "kda":
            self.decay_gate = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.gate_rank, bias=False),
                                            nn.Linear(cfg.gate_rank, hv * d, bias=False))
            self.output_gate = nn.Sequential(nn.Linear(cfg.hidden_size, cfg.gate_rank, bias=False),
                                             nn.Linear(cfg.gate_rank, hv * d, bias=False))
        else:
            self.output_gate = nn.Linear(cfg.hidden_size, hv * d, bias=False)
            if self.kind == "gated_deltanet":
                self.decay_gate = nn.Linear(cfg.hidden_size, hv, bias=False)
        if self.kind in ("gated_deltanet", "kda"):
            width = hv * d if self.kind == "kda" else hv
            # A in [1, 16] and dt in [1e-3, 0.1] log-uniformly, as Mamba2 and Gated DeltaNet start
            self.A_log = nn.Parameter(torch.log(torch.empty(hv).uniform_(1, 16)))
            dt = torch.exp(torch.empty(width).uniform_(math.log(1e-3), math.log(0.1)))
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)

    def log_decay_of(self, x):
        if self.kind == "deltanet":
            return None
        b, c, _ = x.shape
        gate = self.decay_gate(x)
        rate = F.softplus(gate.to(compute_dtype(gate.dtype)) + self.dt_bias)  # fp32 (fp64 for fp64), never bf16
        if self.kind == "kda":
            return -torch.exp(self.A_log)[:, None] * rate.view(b, c, self.value_heads, self.head_dim)
        return -torch.exp(self.A_log) * rate

    def forward(self, x, positions, ctx):
        b, c, _ = x.shape
        hk, hv, d = self.key_heads, self.value_heads, self.head_dim
        qkv = ctx.causal_conv1d(torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1), self.conv, None, "silu")
        q, k, v = qkv.split([hk * d, hk * d, hv * d], dim=-1)
        q, k, beta = (t.to(compute_dtype(t.dtype)) for t in (q, k, self.beta(x)))  # fp32 (fp64 for fp64), never bf16
        q = F.normalize(q.view(b, c, hk, d), dim=-1).to(v.dtype)  # under autocast x stays fp32, v is not
        k = F.normalize(k.view(b, c, hk, d), dim=-1).to(v.dtype)
        beta = self.beta_max * torch.sigmoid(beta)
        o = ctx.delta_rule(q, k, v.view(b, c, hv, d), beta, self.log_decay_of(x), scale=d**-0.5)
        gate = torch.sigmoid(self.output_gate(x)) if self.kind == "kda" else F.silu(self.output_gate(x))
        o = self.head_norm(o) * gate.view(b, c, hv, d)
        return self.o(o.reshape(b, c, -1))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, layer_type: str):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        if layer_type == "N":
            self.attn = SoftmaxAttention(cfg)
        else:
            self.attn = DeltaRuleAttention(cfg) if cfg.linear_kind in DELTA_KINDS else LinearAttention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.hidden_size, cfg.ffn_hidden)

    def forward(self, x, positions, ctx):
        x = x + self.attn(self.attn_norm(x), positions, ctx)
        return x + self.mlp(self.mlp_norm(x))
