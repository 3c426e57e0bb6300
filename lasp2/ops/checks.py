"""Input validation shared by every linear-attention entry point.

All checks are local (no communication) so that a parallel method can run them before its
first collective: a rank that would raise never leaves its peers waiting inside one.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# The four ways a log decay can be given; see `decay_kind`.
DECAY_NONE = "none"  # log_decay=None: basic linear attention
DECAY_HEAD = "head"  # [H]: one constant per head (Lightning, Retention)
DECAY_TOKEN = "token"  # [B, T, H]: data dependent, one scalar per head and token
DECAY_CHANNEL = "channel"  # [B, T, H, K]: data dependent, per key channel (GLA)
DECAY_KINDS = (DECAY_NONE, DECAY_HEAD, DECAY_TOKEN, DECAY_CHANNEL)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class LinearAttnShape:
    """Rank-local problem size, as checked by `check_linear_attn_inputs`."""

    batch: int
    seq_len: int
    num_heads: int
    key_dim: int
    value_dim: int
    decay: str  # one of DECAY_KINDS
    dtype: torch.dtype

    @property
    def decay_width(self) -> int:
        """Channels per head of the chunk transition: K for GLA gates, 1 otherwise."""
        return self.key_dim if self.decay == DECAY_CHANNEL else 1


def _check_tensor(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} has dtype {x.dtype}; it must be a floating dtype "
            f"(float16, bfloat16, float32 or float64)"
        )


def decay_kind(log_decay, q_shape: torch.Size, fn: str) -> str:
    """Classify `log_decay` by its shape against q's [B, T, H, K]."""
    if log_decay is None:
        return DECAY_NONE
    b, t, h, k = q_shape
    shape = tuple(log_decay.shape)
    if shape == (h,):
        return DECAY_HEAD
    if shape == (b, t, h):
        return DECAY_TOKEN
    if shape == (b, t, h, k):
        return DECAY_CHANNEL
    raise ValueError(
        f"{fn}: log_decay has shape {shape}; with q of shape {tuple(q_shape)} it must be "
        f"[H]={(h,)}, [B, T, H]={(b, t, h)} or [B, T, H, K]={(b, t, h, k)}"
    )


def _check_qkv(fn: str, q, k, v) -> None:
    """q, k, v: floating 4-D tensors, none empty, of one dtype on one device."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(fn, name, x)
        if x.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D [B, T, H, D], got shape {tuple(x.shape)}")
        if x.numel() == 0:
            raise ValueError(f"{fn}: {name} is empty (shape {tuple(x.shape)}); every dimension must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")


def check_linear_attn_inputs(
    fn: str,
    q,
    k,
    v,
    log_decay=None,
    initial_state=None,
    *,
    causal: bool = True,
    scale=None,
    check_values: bool = False,
) -> LinearAttnShape:
    """Check q, k, v [B, T, H, K|K|V], log_decay and initial_state [B, H, K, V].

    Raises TypeError for non-tensors and wrong dtypes, ValueError for shapes, empty tensors,
    positive log decays and unsupported causal/decay combinations. Shapes, dtypes and devices are
    metadata and always checked; the positivity of log_decay is data and checked only with
    `check_values` (one reduction, and on a GPU a host sync: never on the hot path by default).
    """
    _check_qkv(fn, q, k, v)
    if q.shape != k.shape:
        raise ValueError(f"{fn}: q and k must have the same shape [B, T, H, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"{fn}: v must be [B, T, H, V] with B, T, H of q {tuple(q.shape[:3])}, got {tuple(v.shape)}"
        )
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a Python number or None, got {type(scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be True or False, got {causal!r}")

    kind = DECAY_NONE
    if log_decay is not None:
        _check_tensor(fn, "log_decay", log_decay)
        if log_decay.device != q.device:
            raise ValueError(f"{fn}: log_decay is on {log_decay.device}, q on {q.device}")
        kind = decay_kind(log_decay, q.shape, fn)
        if check_values and bool((log_decay > 0).any()):
            worst = float(log_decay.max())
            raise ValueError(
                f"{fn}: log_decay must be <= 0 everywhere (a decay exp(log_decay) <= 1); "
                f"its largest value is {worst:g}"
            )
    if not causal and kind != DECAY_NONE:
        raise ValueError(
            f"{fn}: causal=False (bidirectional) is defined only without decay; got log_decay of "
            f"shape {tuple(log_decay.shape)}. Use causal=True or log_decay=None."
        )

    b, t, h, dk = q.shape
    dv = v.shape[-1]
    if initial_state is not None:
        _check_tensor(fn, "initial_state", initial_state)
        if tuple(initial_state.shape) != (b, h, dk, dv):
            raise ValueError(
                f"{fn}: initial_state must be [B, H, K, V]={(b, h, dk, dv)}, got {tuple(initial_state.shape)}"
            )
        if initial_state.device != q.device:
            raise ValueError(f"{fn}: initial_state is on {initial_state.device}, q on {q.device}")
    return LinearAttnShape(b, t, h, dk, dv, kind, q.dtype)


def check_chunk_size(chunk_size, fn: str) -> int:
    """chunk_size must be a positive int (not a bool); returns it."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    return chunk_size


HALF_DTYPES = (torch.bfloat16, torch.float16)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """States and scans run in fp64 for fp64 inputs and in fp32 for everything else."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class SoftmaxAttnShape:
    """Rank-local size of a softmax-attention call, as checked by `check_softmax_attn_inputs`."""

    batch: int
    seq_len: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    value_dim: int
    dtype: torch.dtype


def check_softmax_attn_inputs(fn: str, q, k, v, *, causal: bool = True, scale=None) -> SoftmaxAttnShape:
    """q [B, T, Hq, D], k [B, T, Hkv, D], v [B, T, Hkv, Dv] with Hq % Hkv == 0 (GQA/MQA)."""
    _check_qkv(fn, q, k, v)
    b, t, hq, d = q.shape
    if k.shape[:2] != (b, t) or k.shape[3] != d:
        raise ValueError(f"{fn}: k must be [B, T, Hkv, D] with B, T, D of q {(b, t, d)}, got {tuple(k.shape)}")
    if v.shape[:3] != k.shape[:3]:
        raise ValueError(f"{fn}: v must be [B, T, Hkv, Dv] with B, T, Hkv of k {tuple(k.shape[:3])}, got {tuple(v.shape)}")
    hkv = k.shape[2]
    if hq % hkv:
        raise ValueError(f"{fn}: query heads ({hq}) must be a multiple of key/value heads ({hkv}) for GQA")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a Python number or None, got {type(scale).__name__}")
    if not isinstance(causal, bool):
        raise TypeError(f"{fn}: causal must be True or False, got {causal!r}")
    return SoftmaxAttnShape(b, t, hq, hkv, d, v.shape[3], q.dtype)
