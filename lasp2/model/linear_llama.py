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


class LinearLlama(nn.Module):
    """Embedding, blocks by cfg.layer_types(), final RMSNorm, untied LM head; no biases.

    forward(tokens [B, C], positions [C] or None, ctx or None) -> logits [B, C, vocab]:
    tokens are this rank's shard, positions their global positions (for RoPE) and ctx the
    attention context that does any communication. Without them it is an ordinary model.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.blocks = nn.ModuleList(Block(cfg, t) for t in cfg.layer_types())
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.apply(self._init)

    def _init(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.cfg.init_std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens, positions=None, ctx=None):
        ctx = LocalAttention() if ctx is None else ctx
        positions = torch.arange(tokens.shape[1], device=tokens.device) if positions is None else positions
        h = self.embed(tokens)
        for block in self.blocks:  # the units the trainer may checkpoint or shard (lasp2.parallelize)
            h = block(h, positions, ctx)
        return self.lm_head(self.norm(h))


def count_parameters(cfg: ModelConfig) -> int:
    """Parameters of the model for cfg, counted without allocating them."""
    with torch.device("meta"):
        return sum(p.numel() for p in LinearLlama(cfg).parameters())
