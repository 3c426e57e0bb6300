"""Input checks of the delta-rule ops: shapes, dtypes and (on request) values."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import DECAY_CHANNEL, DECAY_NONE, DECAY_TOKEN, _check_qkv, _check_tensor

# The gate forms of the delta rule (no constant per-head [H] form), and why the others are absent.
DELTA_DECAYS = (DECAY_NONE, DECAY_TOKEN, DECAY_CHANNEL)
DELTA_DECAY_REASON = "the delta rule's gates are per head and token or per key channel"


@dataclass(frozen=True)
class DeltaRuleShape:
    """Problem size as checked by `check_delta_rule_inputs`. q and k have `key_heads` heads; v,
    beta and the gate `value_heads`, a multiple: key head h serves value heads h·G … h·G+G−1."""

    batch: int
    seq_len: int
    key_heads: int
    value_heads: int
    key_dim: int
    value_dim: int
    decay: str  # none | token ([B, T, Hv], Gated DeltaNet) | channel ([B, T, Hv, K], KDA)
    dtype: torch.dtype

    @property
    def group(self) -> int:
        return self.value_heads // self.key_heads


def check_delta_rule_inputs(fn: str, q, k, v, beta, log_decay=None, initial_state=None, *, scale=None,
                            check_values: bool = False) -> DeltaRuleShape:
    """q, k [B, T, Hk, K]; v [B, T, Hv, V] with Hv % Hk == 0; beta [B, T, Hv]; log_decay None,
    [B, T, Hv] or [B, T, Hv, K]; initial_state [B, Hv, K, V].

    Raises TypeError for non-tensors and wrong dtypes, ValueError for shapes. Values (beta in
    [0, 2], log decay <= 0) cost a reduction and, on a GPU, a host sync: checked only with
    `check_values`.
    """
    _check_qkv(fn, q, k, v)
    if q.shape != k.shape:
        raise ValueError(f"{fn}: q and k must have the same shape [B, T, Hk, K], got {tuple(q.shape)} and {tuple(k.shape)}")
    b, t, hk, dk = q.shape
    if v.shape[:2] != (b, t):
        raise ValueError(f"{fn}: v must be [B, T, Hv, V] with B, T of q {(b, t)}, got {tuple(v.shape)}")
    hv, dv = v.shape[2], v.shape[3]
    if hv % hk:
        raise ValueError(f"{fn}: v has {hv} heads and q, k have {hk}; the value heads must be a multiple of the key "
                         f"heads (each key head serves Hv / Hk value heads)")
    if scale is not None and not isinstance(scale, (int, float)):
        raise TypeError(f"{fn}: scale must be a Python number or None, got {type(scale).__name__}")
    _check_tensor(fn, "beta", beta)
    if tuple(beta.shape) != (b, t, hv):
        raise ValueError(f"{fn}: beta must be [B, T, Hv]={(b, t, hv)}, got {tuple(beta.shape)}")
    kind = DECAY_NONE
    tensors = [("beta", beta)]
    if log_decay is not None:
        _check_tensor(fn, "log_decay", log_decay)
        shape = tuple(log_decay.shape)
        if shape == (b, t, hv):
            kind = DECAY_TOKEN
        elif shape == (b, t, hv, dk):
            kind = DECAY_CHANNEL
        else:
            raise ValueError(f"{fn}: log_decay has shape {shape}; it must be [B, T, Hv]={(b, t, hv)} (one gate per "
                             f"value head) or [B, T, Hv, K]={(b, t, hv, dk)} (per key channel; the last dim is K)")
        tensors.append(("log_decay", log_decay))
    if initial_state is not None:
        _check_tensor(fn, "initial_state", initial_state)
        if tuple(initial_state.shape) != (b, hv, dk, dv):
            raise ValueError(f"{fn}: initial_state must be [B, Hv, K, V]={(b, hv, dk, dv)}, got "
                             f"{tuple(initial_state.shape)}")
        tensors.append(("initial_state", initial_state))
    for name, x in tensors:
        if x.device != q.device:
            raise ValueError(f"{fn}: {name} is on {x.device}, q on {q.device}")
    if check_values:
        low, high = float(beta.detach().min()), float(beta.detach().max())
        if low < 0 or high > 2:
            raise ValueError(f"{fn}: beta must lie in [0, 2] (the delta rule's step; 2 allows negative "
                             f"eigenvalues); it spans [{low:g}, {high:g}]")
        if log_decay is not None and bool((log_decay.detach() > 0).any()):
            raise ValueError(f"{fn}: log_decay must be <= 0 everywhere (a decay exp(log_decay) <= 1); its largest "
                             f"value is {float(log_decay.detach().max()):g}")
    return DeltaRuleShape(b, t, hk, hv, dk, dv, kind, q.dtype)
