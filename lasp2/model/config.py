"""Model configuration: one dataclass, presets by name, the hybrid layer pattern."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from fractions import Fraction

LINEAR_KINDS = ("basic", "lightning", "retention", "simple_gla", "gla", "based", "rebased", "deltanet",
                "gated_deltanet", "kda")
# The delta-rule kinds (DeltaNet, Gated DeltaNet, KDA): a short convolution, then the delta rule.
DELTA_KINDS = ("deltanet", "gated_deltanet", "kda")
# The log-decay form each linear kind hands to the attention op (see `layers.LinearAttention`):
# none, per head [H], per token [B, T, H] or per key channel [B, T, H, K].
DECAY_OF_KIND = {"basic": "none", "lightning": "head", "retention": "head", "simple_gla": "token", "gla": "channel",
                 "based": "none", "rebased": "none", "deltanet": "none", "gated_deltanet": "token", "kda": "channel"}


@dataclass(frozen=True)
class ModelConfig:
    """Linear-Llama3: Llama 3 blocks whose attention is linear ("L") or softmax ("N") by layer.

    layer_pattern is repeated to num_layers ("LLLN" = every 4th layer softmax, the paper's
    1/4 hybrid; "L" = pure linear). head_dim defaults to hidden_size / num_heads; ffn_size to
    Llama's 8/3 * hidden rounded up to a multiple of 64. feature_dim is the q/k width before
    Based's Taylor map or Rebased's map; gate_rank the low-rank width of GLA's gate.
    """

    vocab_size: int = 256
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int | None = None
    ffn_size: int | None = None
    layer_pattern: str = "LLLN"
    linear_kind: str = "basic"
    feature_dim: int = 16
    gate_rank: int = 16
    rope_theta: float = 500000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    num_value_heads: int | None = None  # delta-rule kinds: value heads (grouped values), default num_heads
    conv_size: int = 4  # delta-rule kinds: width of the short causal convolution on q, k, v
    allow_neg_eigval: bool = False  # delta-rule kinds: beta in [0, 2] instead of [0, 1]

    def __post_init__(self):
        if self.linear_kind not in LINEAR_KINDS:
            raise ValueError(f"linear_kind={self.linear_kind!r}; choose one of {', '.join(LINEAR_KINDS)}")
        if not self.layer_pattern or set(self.layer_pattern) - {"L", "N"}:
            raise ValueError(f"layer_pattern={self.layer_pattern!r}; use L (linear) and N (softmax), e.g. 'LLLN'")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must divide by num_heads={self.num_heads}")
        if self.value_heads % self.num_heads:
            raise ValueError(f"num_value_heads={self.value_heads} must be a multiple of num_heads={self.num_heads}")
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "feature_dim", "gate_rank",
                     "conv_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def decay_form(self) -> str:
        """The log-decay form of the linear layers: none, head, token or channel."""
        return DECAY_OF_KIND[self.linear_kind]

    @property
    def value_heads(self) -> int:
        """Heads of v (and beta, gates) in the delta-rule kinds; q and k have num_heads."""
        return self.num_value_heads or self.num_heads

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_size or -(-(8 * self.hidden_size // 3) // 64) * 64

    def layer_types(self) -> str:
        """'L' or 'N' for each layer."""
        reps = -(-self.num_layers // len(self.layer_pattern))
        return (self.layer_pattern * reps)[: self.num_layers]

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def pattern_for_ratio(ratio: str | float) -> str:
    """Hybrid ratio (share of softmax layers) -> pattern: 0 -> 'L', 1/8 -> 'LLLLLLLN',
    1/4 -> 'LLLN', 1/2 -> 'LN', 1 -> 'N'."""
    frac = Fraction(ratio).limit_denominator(64) if not isinstance(ratio, str) else Fraction(ratio)
    if not 0 <= frac <= 1 or (frac and frac.numerator != 1):
        raise ValueError(f"hybrid ratio {ratio} must be 0 or 1/n (e.g. 0, 1/8, 1/4, 1/2, 1)")
    if frac == 0:
        return "L"
    return "L" * (frac.denominator - 1) + "N"


# Llama 3's tokenizer has 128256 tokens; the trainer replaces vocab_size by its tokenizer's.
PRESETS = {
    "debug": ModelConfig(vocab_size=256, hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2),
    # Narrower and twice as deep as debug: 8 layers give every hybrid ratio down to 1/8 a softmax
    # layer, at about debug's cost per token (the convergence study's model).
    "tiny": ModelConfig(vocab_size=256, hidden_size=128, num_layers=8, num_heads=4, num_kv_heads=2),
    "0.3b": ModelConfig(vocab_size=128256, hidden_size=1024, num_layers=16, num_heads=16, num_kv_heads=4,
                        ffn_size=4096),
    "1b": ModelConfig(vocab_size=128256, hidden_size=2048, num_layers=16, num_heads=16, num_kv_heads=8,
                      ffn_size=8192),
    "8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=8,
                      ffn_size=14336),
}


def preset(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].replace(**overrides)
