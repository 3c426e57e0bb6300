"""The delta rule in chunks (the WY / UT representation), on one device.

Within a chunk of L tokens entering with state S0 (per value head; g cumulated from the chunk's
start: γ_t = Σ_{s<=t} g_s), write S_t = Γ_t S0 + Σ_{s<=t} (Γ_t/Γ_s) k_s^T u_s with the
"pseudo-values" u_t = β_t (v_t − k_t Γ_t/Γ_{t−1} S_{t−1}). They solve one unit lower-triangular
system per chunk,

    (I + A) U = β ⊙ V − (β ⊙ K̃) S0,     A_ts = β_t Σ_c k_tc k_sc exp(γ_tc − γ_sc)  (s < t),
                                         K̃_t = k_t ⊙ exp(γ_t),

so U = Ū − W S0 with W = (I + A)^{-1} (β ⊙ K̃) and Ū = (I + A)^{-1} (β ⊙ V). Then

    O   = scale · (Q̃ S0 + P U),          Q̃_t = q_t ⊙ exp(γ_t),  P_ts = Σ_c q_tc k_sc exp(γ_tc − γ_sc)  (s <= t)
    S_L = Γ_L S0 + K̂^T U,               K̂_s = k_s ⊙ exp(γ_L − γ_s)

i.e. each chunk is an affine map of its incoming state, S_L = (Γ_L − K̂^T W) S0 + K̂^T Ū: the
summary LASP-2 passes between ranks. Every exponent is a difference γ_t − γ_s with s <= t (<= 0),
so strong gates stay finite; per-channel gates form those differences per channel, in chunks of
at most 16 tokens. Everything within a chunk is batched over chunks; one short loop carries the
state from chunk to chunk.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import DECAY_CHANNEL, DECAY_NONE, check_chunk_size, compute_dtype
from .delta_checks import DeltaRuleShape, check_delta_rule_inputs

CHANNEL_CHUNK = 16


def _chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """[B, T, H, ...] (T a multiple of L) -> [B, H, n, L, ...]."""
    b, t, h = x.shape[:3]
    return x.reshape(b, t // L, L, h, *x.shape[3:]).movedim(3, 1)


@dataclass
class DeltaChunks:
    """The within-chunk terms of a sequence, batched over chunks ([B, H, n, L, ...], value heads):
    qg = Q̃, P, W, U_bar = Ū, k_end = K̂ and decay_end = exp(γ_L) as a row factor [B, H, n, K|1, 1]
    (None without a gate)."""

    qg: torch.Tensor
    P: torch.Tensor
    W: torch.Tensor
    U_bar: torch.Tensor
    k_end: torch.Tensor
    decay_end: torch.Tensor | None
    seq_len: int

    @property
    def n_chunks(self) -> int:
        return self.qg.shape[2]

    def zero_state(self) -> torch.Tensor:
        b, h = self.qg.shape[:2]
        return self.qg.new_zeros(b, h, self.W.shape[-1], self.U_bar.shape[-1])

    def per_chunk(self, name: str) -> tuple[torch.Tensor, ...]:
        """One field split into its chunks. (unbind, not indexing in a loop: the backward of an
        index writes into a zero tensor of the whole field, once per chunk.)"""
        field = getattr(self, name)
        return (None,) * self.n_chunks if field is None else field.unbind(2)

    def carry(self, state: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """From `state` entering the first chunk: each chunk's output (unscaled, [B, H, L, V]) and
        the state after the last chunk."""
        outputs = []
        for qg, P, W, U_bar, k_end, decay_end in zip(*map(self.per_chunk, ("qg", "P", "W", "U_bar", "k_end",
                                                                             "decay_end"))):
            U = U_bar - W @ state  # U = Ū − W S
            outputs.append(qg @ state + P @ U)  # Q̃ S + P U
            carried = state if decay_end is None else decay_end * state
            state = carried + k_end.transpose(-1, -2) @ U  # Γ_L S + K̂^T U
        return outputs, state

    def transitions(self) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The dense K x K maps: the product of the chunks before each chunk (I for the first)
        and of all of them (the sequence's M: S_out = M S_in + h)."""
        b, h, _, _, K = self.W.shape
        M = torch.eye(K, dtype=self.W.dtype, device=self.W.device).expand(b, h, K, K)
        before = []
        for W, k_end, decay_end in zip(*map(self.per_chunk, ("W", "k_end", "decay_end"))):
            before.append(M)
            step = -(k_end.transpose(-1, -2) @ W)  # Γ_L − K̂^T W
            step = step + (torch.diag_embed(decay_end[..., 0].expand(b, h, K))
                           if decay_end is not None else torch.eye(K, dtype=M.dtype, device=M.device))
            M = step @ M
        return before, M

    def unchunk(self, outputs: list[torch.Tensor], scale: float, dtype: torch.dtype) -> torch.Tensor:
        """[B, H, L, V] per chunk -> o [B, T, H, V] (padding dropped), scaled, in `dtype`."""
        o = scale * torch.stack(outputs, dim=2)
        b, h, n, L, dv = o.shape
        return o.movedim(1, 3).reshape(b, n * L, h, dv)[:, :self.seq_len].to(dtype)


def delta_chunks(shape: DeltaRuleShape, q, k, v, beta, log_decay, chunk_size: int) -> DeltaChunks:
    """The within-chunk terms of q, k [B, T, Hk, K], v [B, T, Hv, V], beta [B, T, Hv] and the
    gate (see the module's docstring), in the compute dtype; chunk_size already checked."""
    dtype = compute_dtype(shape.dtype)
    L = min(chunk_size, CHANNEL_CHUNK) if shape.decay == DECAY_CHANNEL else chunk_size
    L = min(L, shape.seq_len)
    pad = -shape.seq_len % L  # padded tokens have k = v = beta = g = 0: they leave the state as it is

    def prepare(x, heads_repeat=1):
        x = x.to(dtype)
        if heads_repeat > 1:
            x = x.repeat_interleave(heads_repeat, dim=2)
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x

    qc, kc = (_chunks(prepare(x, shape.group), L) for x in (q, k))  # [B, H, n, L, K]
    vc = _chunks(prepare(v), L)  # [B, H, n, L, V]
    bc = _chunks(prepare(beta), L)  # [B, H, n, L]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    strict = causal.tril(-1)
    decay_end = None
    if shape.decay == DECAY_NONE:
        qg, kg, k_end = qc, kc, kc
        scores_kk = kc @ kc.transpose(-1, -2)
        scores_qk = qc @ kc.transpose(-1, -2)
    else:
        gamma = torch.cumsum(_chunks(prepare(log_decay), L), dim=3)  # [B, H, n, L(, K)]
        if shape.decay == DECAY_CHANNEL:
            gamma_end = gamma[..., -1, :]  # [B, H, n, K]
            diff = gamma.unsqueeze(-2) - gamma.unsqueeze(-3)  # [.., t, s, K]: γ_t − γ_s
            decay = torch.exp(diff.masked_fill(~causal[..., None], float("-inf")))
            scores_kk = torch.einsum("...tc,...sc,...tsc->...ts", kc, kc, decay)
            scores_qk = torch.einsum("...tc,...sc,...tsc->...ts", qc, kc, decay)
            qg, kg = qc * torch.exp(gamma), kc * torch.exp(gamma)
            k_end = kc * torch.exp(gamma_end.unsqueeze(-2) - gamma)
            decay_end = torch.exp(gamma_end)[..., None]  # [B, H, n, K, 1]
        else:
            gamma_end = gamma[..., -1]  # [B, H, n]
            decay = torch.exp((gamma.unsqueeze(-1) - gamma.unsqueeze(-2)).masked_fill(~causal, float("-inf")))
            scores_kk = (kc @ kc.transpose(-1, -2)) * decay
            scores_qk = (qc @ kc.transpose(-1, -2)) * decay
            qg, kg = qc * torch.exp(gamma)[..., None], kc * torch.exp(gamma)[..., None]
            k_end = kc * torch.exp(gamma_end.unsqueeze(-1) - gamma)[..., None]
            decay_end = torch.exp(gamma_end)[..., None, None]  # [B, H, n, 1, 1]
    eye = torch.eye(L, dtype=dtype, device=q.device)
    system = eye + bc.unsqueeze(-1) * scores_kk.masked_fill(~strict, 0.0)  # I + A, unit lower triangular
    rhs = torch.cat([bc.unsqueeze(-1) * kg, bc.unsqueeze(-1) * vc], dim=-1)
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)
    W, U_bar = solved[..., :shape.key_dim], solved[..., shape.key_dim:]  # [B, H, n, L, K|V]
    return DeltaChunks(qg, scores_qk.masked_fill(~causal, 0.0), W, U_bar, k_end, decay_end, shape.seq_len)


def chunk_delta_rule(q, k, v, beta, log_decay=None, *, scale=None, initial_state=None, output_final_state=False,
                     chunk_size=64, validate=False):
    """Delta rule (DeltaNet, Gated DeltaNet, KDA) in chunks; the shapes and semantics of
    `naive_recurrent_delta_rule`.

    Args:
        q, k: [B, T, Hk, K]; v: [B, T, Hv, V] with Hv % Hk == 0; beta: [B, T, Hv] in [0, 2].
        log_decay: None, [B, T, Hv] or [B, T, Hv, K], every value <= 0.
        scale: None means 1. initial_state: [B, Hv, K, V] or None.
        output_final_state: also return the state after the last token.
        chunk_size: tokens per chunk (per-channel gates use at most 16).
        validate: also check the values (beta in [0, 2], log decay <= 0): a host sync on GPU.
    Returns:
        (o [B, T, Hv, V] in v's dtype, final state [B, Hv, K, V] in fp32 (fp64 for fp64 inputs)
        or None). Differentiable by autograd in every input.
    """
    shape = check_delta_rule_inputs("chunk_delta_rule", q, k, v, beta, log_decay, initial_state, scale=scale,
                                    check_values=validate)
    chunks = delta_chunks(shape, q, k, v, beta, log_decay, check_chunk_size(chunk_size, "chunk_delta_rule"))
    state = chunks.zero_state() if initial_state is None else initial_state.to(chunks.qg.dtype)
    outputs, state = chunks.carry(state)
    o = chunks.unchunk(outputs, 1.0 if scale is None else float(scale), shape.dtype)
    return o, (state if output_final_state else None)
