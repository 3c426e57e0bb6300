"""Linear-Llama3: Llama 3 with linear attention in some (or all) layers."""
from __future__ import annotations

import torch
import torch.nn as nn

from ..ops.chunk import chunk_linear_attn
from ..ops.conv import causal_conv1d
from ..ops.delta_chunk import chunk_delta_rule
from ..ops.documents import documents
from ..ops.softmax_attn import softmax_attn
from .config import ModelConfig
from .layers import Block, RMSNorm


class LocalAttention:
    """The single-device attention context: the interface of lasp2.parallel.SequenceParallel
    (cu_seqlens: the packed documents of one row, B = 1, or None)."""

    world = 1

    def __init__(self, cu_seqlens=None):
        self.cu_seqlens = cu_seqlens

    def with_documents(self, cu_seqlens) -> "LocalAttention":
        """This context for one packed row (its documents checked once, `lasp2.ops.Documents`)."""
        return LocalAttention(documents(cu_seqlens, "LocalAttention.with_documents"))

    def linear_attn(self, q, k, v, log_decay=None, causal=True, scale=None):
        return chunk_linear_attn(q, k, v, log_decay, causal=causal, scale=scale, cu_seqlens=self.cu_seqlens)[0]

    def softmax_attn(self, q, k, v, causal=True, scale=None):
        return softmax_attn(q, k, v, causal=causal, scale=scale, cu_seqlens=self.cu_seqlens)

    def delta_rule(self, q, k, v, beta, log_decay=None, scale=None):
        return chunk_delta_rule(q, k, v, beta, log_decay, scale=scale, cu_seqlens=self.cu_seqlens)[0]

    def causal_conv1d(self, x, weight, bias=None, activation="silu"):
        return causal_conv1d(x, weight, bias, activation=activation, cu_seqlens=self.cu_seqlens)


# Parameter names that stay fp32 under mixed precision (see fp32_parameter_names).
FP32_PARAMETERS = ("A_log", "dt_bias")


def _parts(cfg: ModelConfig) -> list:
    """The model's top-level parts in the order the constructor makes them, each with its maker:
    a maker draws the same random numbers (torch's CPU generator) whenever it runs."""
    return [("embed", lambda: nn.Embedding(cfg.vocab_size, cfg.hidden_size)),
            *[(f"blocks.{i}", lambda t=t: Block(cfg, t)) for i, t in enumerate(cfg.layer_types())],
            ("norm", lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps)),
            ("lm_head", lambda: nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False))]


def _post_order(module: nn.Module, prefix: str = ""):
    """(name, module) children first, as Module.apply visits them."""
    for name, child in module.named_children():
        yield from _post_order(child, f"{prefix}{name}.")
    yield prefix.rstrip("."), module


class LinearLlama(nn.Module):
    """Embedding, blocks by cfg.layer_types(), final RMSNorm, untied LM head; no biases.

    forward(tokens [B, C], positions [C] or None, ctx or None, logits_at=None) -> logits
    [B, C, vocab]: tokens are this rank's shard, positions their global positions (for RoPE) and
    ctx the attention context that does any communication. Without them it is an ordinary model.
    logits_at: the local indices [n] whose logits to compute ([B, n, vocab]; a prompt's prefill
    needs its last token's only).

    Built under `torch.device("meta")` it allocates nothing: shard it (FSDP2), `to_empty` it, then
    fill it from `initial_values()` (lasp2.parallelize.initialize), which gives the weights this
    constructor would have drawn from the same RNG state, on every rank, one part at a time.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        made = {name: make() for name, make in _parts(cfg)}
        self.embed = made["embed"]
        self.blocks = nn.ModuleList(made[f"blocks.{i}"] for i in range(cfg.num_layers))
        self.norm, self.lm_head = made["norm"], made["lm_head"]
        for _, module in _post_order(self):
            for name, draw in self._redrawn(module):
                draw(getattr(module, name))

    def _redrawn(self, module) -> list:
        """[(parameter name, in-place init)] of the tensors the constructor draws again once every
        part is made: Linear and Embedding weights normal(0, init_std), biases zero."""
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            return []
        out = [("weight", lambda t: nn.init.normal_(t, std=self.cfg.init_std))]
        return out + ([("bias", nn.init.zeros_)] if getattr(module, "bias", None) is not None else [])

    @torch.no_grad()
    def initial_values(self):
        """(name, tensor) for every parameter and buffer: the values the constructor gives them
        from torch's current RNG state, each whole and on the CPU, drawn in the constructor's
        order (it rebuilds one part at a time, then redraws the weights as the constructor
        does). Works on a model whose tensors are on the meta device or sharded; memory is one
        part at a time. A tensor the second pass redraws is given once, with its final value."""
        redrawn = {f"{prefix}.{name}".lstrip(".") for prefix, module in _post_order(self)
                   for name, _ in self._redrawn(module)}
        with torch.device("cpu"):
            for part, make in _parts(self.cfg):
                fresh = make()
                for name, value in (*fresh.named_parameters(), *fresh.named_buffers()):
                    if f"{part}.{name}" not in redrawn:
                        yield f"{part}.{name}", value.detach()
                del fresh
            for prefix, module in _post_order(self):
                for name, draw in self._redrawn(module):
                    value = torch.empty(getattr(module, name).shape, dtype=getattr(module, name).dtype)
                    draw(value)
                    yield f"{prefix}.{name}".lstrip("."), value

    def fp32_parameter_names(self) -> list[str]:
        """The parameters that form decays and must stay fp32 under mixed precision (bf16 would
        round A_log by up to 2^-8 relative, so exp(A_log) by ~1%): the delta rule's A_log and
        dt_bias. (Fixed decays are buffers, which mixed precision leaves alone.)"""
        return [name for name, _ in self.named_parameters() if name.rsplit(".", 1)[-1] in FP32_PARAMETERS]

    def forward(self, tokens, positions=None, ctx=None, logits_at=None):
        ctx = LocalAttention() if ctx is None else ctx
        positions = torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions
        h = self.embed(tokens)
        for block in self.blocks:  # the units the trainer may checkpoint or shard (lasp2.parallelize)
            h = block(h, positions, ctx)
        if logits_at is not None:
            h = h[:, logits_at]
        return self.lm_head(self.norm(h))


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model for cfg, counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in LinearLlama(cfg).parameters())
