"""The delta rule in chunks (the WY / UT representation): the forward and backward pieces that the
single-device op (`delta_chunk.py`) and the sequence-parallel methods (`parallel/delta.py`)
assemble. No autograd here: every gradient is written out.

Within a chunk of L tokens entering with state S (per value head; γ the log gate cumulated from
the chunk's start, per token or per key channel), the "pseudo-values" U = β ⊙ (V − K' S') of the
delta updates solve one unit lower-triangular system per chunk,

    (I + A) U = β ⊙ V − (β ⊙ K̃) S,   A_ts = β_t Σ_c k_tc k_sc exp(γ_tc − γ_sc) (s < t),   K̃ = K ⊙ exp(γ),

so U = Ū − W S with W = (I + A)^{-1} (β ⊙ K̃) and Ū = (I + A)^{-1} (β ⊙ V). Then

    O      = Q̃ S + P U = Qe S + P Ū,      Q̃ = Q ⊙ exp(γ),  P_ts = Σ_c q_tc k_sc exp(γ_tc − γ_sc) (s <= t),
                                           Qe = Q̃ − P W
    S_next = Γ S + K̂^T U,                 Γ = exp(γ_L) (a row factor), K̂_s = k_s ⊙ exp(γ_L − γ_s)

Everything but the last line is batched over chunks; one short loop carries the state (and, for
the backward, its gradient) from chunk to chunk. A chunk is the affine map
S_next = (Γ − K̂^T W) S + K̂^T Ū of its entering state, which is what LASP-2 passes between ranks.
Every exponent is a difference γ_t − γ_s with s <= t (<= 0), so strong gates stay finite;
per-channel gates form those differences per channel, in chunks of at most 16 tokens.

Backward (dO already scaled; d_next: the gradient on the state leaving each chunk):
    dQe = dO S^T,  dP = dO Ū^T − dQe W^T,  dŪ = P^T dO + K̂ d_next,  dW = −P^T dQe − K̂ d_next S^T,
    dK̂ = U d_next^T,  dΓ = Σ_v d_next ⊙ S,  d_entering = Qe^T dO + Γ d_next − W^T K̂ d_next,
then through the solve ([dR_W | dR_Ū] = (I + A)^{-T} [dW | dŪ], dA = −dR_W W^T − dR_Ū Ū^T below the
diagonal), the scores and the gate factors to q, k, v, β and γ, and γ's gradient to the gate's by
a reversed cumulative sum.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .checks import DECAY_CHANNEL, DECAY_NONE, DECAY_TOKEN, HALF_DTYPES, compute_dtype
from .chunk_kernels import bmm, bmm_plus
from .delta_checks import DeltaRuleShape
from .policy import policy_for
from .scan import prefix_scan, scans_as_trees, suffix_scan

CHANNEL_CHUNK = 16
# The chunk terms that cost matmuls or a solve to make (the others are copies and element-wise
# factors of the inputs): kept for the backward or recomputed, as the device policy says.
COSTLY = ("scores_kk", "inverse", "W", "U_bar", "P", "Qe")


def _chunks(x: torch.Tensor, L: int) -> torch.Tensor:
    """[B, T, H, ...] (T a multiple of L) -> [B, H, n, L, ...]."""
    b, t, h = x.shape[:3]
    return x.reshape(b, t // L, L, h, *x.shape[3:]).movedim(3, 1)


def _t(x: torch.Tensor) -> torch.Tensor:
    return x.transpose(-1, -2)


def _mm(half: torch.dtype | None, a: torch.Tensor, b: torch.Tensor, acc: torch.Tensor | None = None,
        alpha: float = 1.0) -> torch.Tensor:
    """A chunk matmul a @ b (`chunk_kernels.bmm`; into `acc` when given). half: None, or the
    half dtype both operands are rounded to (`DeltaChunks.half`: fp32 accumulation and result)."""
    if half is not None:
        a, b = a.to(half), b.to(half)
    return bmm(a, b, acc=acc, alpha=alpha)


def _mm_plus(half: torch.dtype | None, c: torch.Tensor, a: torch.Tensor, b: torch.Tensor, alpha: float = 1.0):
    """c + alpha · (a @ b) into a new tensor, the matmul as `_mm`'s."""
    if half is not None:
        a, b = a.to(half), b.to(half)
    return bmm_plus(c, a, b, alpha=alpha)


def _scores(a: torch.Tensor, b: torch.Tensor, decay: torch.Tensor | None, half: torch.dtype | None) -> torch.Tensor:
    """Σ_c a_tc b_sc exp(γ_tc − γ_sc) for every pair of a chunk (before masking): decay is None,
    [.., L, L] or [.., L, L, K] (per channel: a three-way product in the compute dtype, never a
    half matmul)."""
    if decay is None:
        return _mm(half, a, _t(b))
    if decay.dim() == a.dim() + 1:
        return torch.einsum("...tc,...sc,...tsc->...ts", a, b, decay)
    return _mm(half, a, _t(b)).mul_(decay)


def _channel_scores_grads(d: torch.Tensor, a: torch.Tensor, b: torch.Tensor, decay: torch.Tensor):
    """The backward of `_scores` with a per-channel decay [.., L, L, K]: (da, db, the gradient of
    γ [.., L, K])."""
    da = torch.einsum("...ts,...sc,...tsc->...tc", d, b, decay)
    db = torch.einsum("...ts,...tc,...tsc->...sc", d, a, decay)
    return da, db, a * da - b * db


def _tril(L: int, device, diagonal: int = 0) -> torch.Tensor:
    return torch.ones(L, L, dtype=torch.bool, device=device).tril(diagonal)


@dataclass
class DeltaChunks:
    """A sequence's chunks and their within-chunk terms, batched over chunks: [B, H, n, L, ...]
    per value head, in the compute dtype. `gamma` is the cumulated log gate ([.., L] or
    [.., L, K]; None without one), `decay` exp(γ_t − γ_s) on and below the diagonal ([.., L, L]
    or [.., L, L, K]; with document resets, zero between tokens of different documents),
    `decay_end` Γ as a row factor [.., K|1, 1]. `to_start` and `to_end` are the factors
    [.., L, K|1] of Q̃ = Q ⊙ to_start, K̃ = K ⊙ to_start and K̂ = K ⊙ to_end (None: 1). With
    resets they also drop the tokens that a reset separates from the chunk's start or end. The
    query side (qg = Q̃, P, Qe, PU = P Ū) is filled by `add_query_side`. `half`: None, or the
    half dtype of the inputs when the device policy runs half matmuls (`Policy.half_matmuls`):
    every chunk matmul then rounds both operands to it and accumulates in fp32, while the
    fields, the solve, the states and the scans stay in the compute dtype."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    beta: torch.Tensor
    gamma: torch.Tensor | None
    decay: torch.Tensor | None
    kg: torch.Tensor  # K̃
    scores_kk: torch.Tensor  # Σ_c k_tc k_sc exp(γ_tc − γ_sc), zero on and above the diagonal
    inverse: torch.Tensor  # (I + A)^{-1}, unit lower triangular
    W: torch.Tensor
    U_bar: torch.Tensor
    k_end: torch.Tensor  # K̂
    decay_end: torch.Tensor | None
    to_start: torch.Tensor | None
    to_end: torch.Tensor | None
    shape: DeltaRuleShape
    qg: torch.Tensor | None = None
    P: torch.Tensor | None = None
    Qe: torch.Tensor | None = None
    PU: torch.Tensor | None = None
    maps: torch.Tensor | None = None  # `chunk_maps`, made when a scan needs them
    half: torch.dtype | None = None

    @property
    def n_chunks(self) -> int:
        return self.q.shape[2]

    def kept_for_backward(self) -> tuple:
        """The terms made by matmuls and the triangular solve (`COSTLY`) when the device policy
        keeps them for the backward, else Nones (`rebuild_chunks` then recomputes them); the
        rest are layout copies and element-wise factors, always recomputed."""
        if policy_for(self.q.device).keeps_costly_terms:
            return tuple(getattr(self, name) for name in COSTLY)
        return (None,) * len(COSTLY)

    def per_chunk(self, name: str) -> tuple[torch.Tensor, ...]:
        """One field split into its chunks (unbind: indexing in a loop would cost a whole-field
        write per chunk in any autograd around it)."""
        field = getattr(self, name)
        return (None,) * self.n_chunks if field is None else field.unbind(2)

    def zero_state(self, width: int | None = None) -> torch.Tensor:
        b, h = self.q.shape[:2]
        return self.q.new_zeros(b, h, self.shape.key_dim, self.shape.value_dim if width is None else width)

    def output_grad(self, do: torch.Tensor | None, scale: float) -> torch.Tensor:
        """dO [B, T, H, V] (or None: zeros) -> scale · dO chunked like v, in the compute dtype."""
        if do is None:
            return torch.zeros_like(self.v)
        pad = self.v.shape[2] * self.v.shape[3] - do.shape[1]
        do = _chunks(F.pad(do, (0, 0, 0, 0, 0, pad)) if pad else do, self.v.shape[3])
        return do.to(dtype=self.v.dtype, memory_format=torch.contiguous_format, copy=True).mul_(scale)

    def unchunk(self, o: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, H, n, L, D] -> [B, T, H, D] (padding dropped) in `dtype`."""
        b, h, n, L, d = o.shape
        o = o.movedim(1, 3).to(dtype=dtype, memory_format=torch.contiguous_format)  # one copy: layout and cast
        return o.reshape(b, n * L, h, d)[:, :self.shape.seq_len]


def _reset_masks(resets: torch.Tensor, L: int, pad: int):
    """resets [B, T] (True at a document's first token) -> (same document [B, 1, n, L, L],
    no reset from the chunk's start to t [B, 1, n, L, 1], none after t to its end [.., L, 1],
    none in the whole chunk [B, 1, n, 1, 1]), as bools."""
    r = F.pad(resets, (0, pad)) if pad else resets
    seg = torch.cumsum(r.view(r.shape[0], 1, -1, L).long(), dim=-1)  # documents begun in the chunk up to t
    same = seg.unsqueeze(-1) == seg.unsqueeze(-2)
    return same, (seg == 0).unsqueeze(-1), (seg == seg[..., -1:]).unsqueeze(-1), (seg[..., -1:] == 0).unsqueeze(-1)


def delta_chunks(shape: DeltaRuleShape, q, k, v, beta, log_decay, chunk_size: int,
                 resets: torch.Tensor | None = None, kept: tuple | None = None) -> DeltaChunks:
    """The key side of q, k [B, T, Hk, K], v [B, T, Hv, V], beta [B, T, Hv] and the gate: what
    carrying the state needs (W, Ū, K̂, Γ); chunk_size already checked. resets [B, T] (None: no
    document boundaries) marks each document's first token: its state starts from zero. kept:
    `kept_for_backward()` of the same chunks, kept by a forward (then only the cheap terms are made)."""
    dtype = compute_dtype(shape.dtype)
    half = shape.dtype if shape.dtype in HALF_DTYPES and policy_for(q.device).half_matmuls else None
    L = min(chunk_size, CHANNEL_CHUNK) if shape.decay == DECAY_CHANNEL else chunk_size
    L = min(L, shape.seq_len)
    pad = -shape.seq_len % L  # padded tokens have k = v = beta = g = 0: they leave the state as it is

    def prepare(x, heads_repeat=1):
        if heads_repeat > 1:
            x = x.repeat_interleave(heads_repeat, dim=2)
        x = _chunks(F.pad(x, (0, 0) * (x.dim() - 2) + (0, pad)) if pad else x, L)
        # One copy casts and lays out: every later matmul reads contiguous chunks.
        return x.to(dtype=dtype, memory_format=torch.contiguous_format)

    qc, kc = prepare(q, shape.group), prepare(k, shape.group)  # [B, H, n, L, K]
    vc, bc = prepare(v), prepare(beta)  # [B, H, n, L, V], [B, H, n, L]
    causal = _tril(L, q.device)
    gamma = decay = decay_end = to_start = to_end = None
    if shape.decay != DECAY_NONE:
        gamma = torch.cumsum(prepare(log_decay), dim=3)  # [B, H, n, L(, K)]
        per_channel = gamma if shape.decay == DECAY_CHANNEL else gamma[..., None]  # [.., L, K|1]
        diff = per_channel.unsqueeze(-2) - per_channel.unsqueeze(-3)  # [.., t, s, K|1]: γ_t − γ_s
        decay = torch.exp(diff.masked_fill(~causal[..., None], float("-inf")))
        if shape.decay == DECAY_TOKEN:
            decay = decay[..., 0]
        to_start, to_end = torch.exp(per_channel), torch.exp(per_channel[..., -1:, :] - per_channel)
        decay_end = torch.exp(per_channel[..., -1, :])[..., None]  # [B, H, n, K|1, 1]
    if resets is not None:  # a document's tokens see neither the state before it nor other documents
        same, from_start, to_last, whole = _reset_masks(resets, L, pad)
        if decay is None:
            decay = (same & causal).to(dtype)
        else:
            decay = decay * (same.unsqueeze(-1) if shape.decay == DECAY_CHANNEL else same)
        to_start = from_start.to(dtype) if to_start is None else to_start * from_start
        to_end = to_last.to(dtype) if to_end is None else to_end * to_last
        decay_end = whole.to(dtype) if decay_end is None else decay_end * whole
    kg = kc if to_start is None else kc * to_start  # K̃
    k_end = kc if to_end is None else kc * to_end  # K̂
    if kept is not None:
        scores_kk, inverse, W, U_bar, P, Qe = kept
        x = DeltaChunks(qc, kc, vc, bc, gamma, decay, kg, scores_kk, inverse, W, U_bar, k_end, decay_end, to_start,
                        to_end, shape, P=P, Qe=Qe, half=half)
        x.qg = _decayed_queries(x)
        return x
    scores_kk = _scores(kc, kc, decay, half).masked_fill(~causal.tril(-1), 0.0)
    eye = torch.eye(L, dtype=dtype, device=q.device)
    # The inverse, kept: the backward's solve becomes a matmul (a batched triangular solve runs
    # at a fraction of a matmul's speed on CPUs).
    inverse = torch.linalg.solve_triangular(eye + bc.unsqueeze(-1) * scores_kk, eye.expand_as(scores_kk), upper=False,
                                            unitriangular=True)
    W = _mm(half, inverse, bc.unsqueeze(-1) * kg)  # [B, H, n, L, K]
    U_bar = _mm(half, inverse, bc.unsqueeze(-1) * vc)  # [B, H, n, L, V]
    return DeltaChunks(qc, kc, vc, bc, gamma, decay, kg, scores_kk, inverse, W, U_bar, k_end, decay_end, to_start,
                       to_end, shape, half=half)


def _decayed_queries(x: DeltaChunks) -> torch.Tensor:
    """Q̃ = Q ⊙ exp(γ) (with resets: zero for the tokens a reset separates from the chunk's start)."""
    return x.q if x.to_start is None else x.q * x.to_start


def add_query_side(x: DeltaChunks, outputs: bool = True) -> DeltaChunks:
    """Fills Q̃, P, Qe = Q̃ − P W and (outputs=True) P Ū: what the outputs need beyond the states
    (the backward needs all but P Ū)."""
    L = x.q.shape[3]
    x.qg = _decayed_queries(x)
    causal = _tril(L, x.q.device)
    x.P = _scores(x.q, x.k, x.decay, x.half).masked_fill(~causal, 0.0)
    x.Qe = _mm_plus(x.half, x.qg, x.P, x.W, alpha=-1)
    x.PU = _mm(x.half, x.P, x.U_bar) if outputs else None
    return x


def rebuild_chunks(shape: DeltaRuleShape, inputs: tuple, chunk_size: int, resets, kept: list) -> DeltaChunks:
    """The chunks a backward needs, from the inputs a forward saved and the costly terms it kept
    (a list of Nones when it kept none: then everything is recomputed)."""
    if kept[0] is None:
        return add_query_side(delta_chunks(shape, *inputs, chunk_size, resets), outputs=False)
    return delta_chunks(shape, *inputs, chunk_size, resets, kept=tuple(kept))


def carry(x: DeltaChunks, state: torch.Tensor, *, values: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The state entering each chunk [B, H, n, K, V] and the state after the last one [B, H, K, D],
    from `state` [B, H, K, D] entering the first. With values=True the first V columns are the
    state itself (U = Ū − W S); the other columns, or all of them with values=False, carry only
    what they feed (U = −W S): from I, the chunks' K x K transition.

    As the device policy's `scan` says (compiled: always the tree): chunk by chunk (K x V
    matmuls, no map formed), or as a log-depth scan over the chunks' maps (`chunk_maps`),
    `state` as one more slot before them."""
    V = x.U_bar.shape[-1]
    if scans_as_trees(x.q.device):
        made = x.U_bar.new_zeros(*x.U_bar.shape[:3], *state.shape[-2:])  # what a chunk adds from a zero state
        if values:  # K̂^T Ū in the value columns
            made[..., :V] = _mm(x.half, _t(x.k_end), x.U_bar)
        before, end = prefix_scan(torch.cat([state.unsqueeze(2), made], dim=2), _with_identity(chunk_maps(x), first=True),
                                  dense=True)
        return before[:, :, 1:, :, :V], end
    entering = []
    for W, U_bar, k_end, decay_end in zip(*map(x.per_chunk, ("W", "U_bar", "k_end", "decay_end"))):
        entering.append(state[..., :V])
        U = -(W @ state)
        if values:
            U[..., :V] += U_bar
        state = (state if decay_end is None else decay_end * state) + _t(k_end) @ U
    return torch.stack(entering, dim=2), state


def chunk_maps(x: DeltaChunks) -> torch.Tensor:
    """[B, H, n, K, K] each chunk's transition Γ − K̂^T W (S_next = that S + K̂^T Ū), made once
    per DeltaChunks."""
    if x.maps is None:
        maps = _mm(x.half, _t(x.k_end), x.W).neg_()
        maps.diagonal(dim1=-2, dim2=-1).add_(1.0 if x.decay_end is None else x.decay_end[..., 0])
        x.maps = maps
    return x.maps


def _with_identity(maps: torch.Tensor, first: bool) -> torch.Tensor:
    """maps [B, H, n, K, K] with one identity slot before (first) or after them."""
    eye = torch.eye(maps.shape[-1], dtype=maps.dtype, device=maps.device).expand_as(maps[:, :, :1])
    return torch.cat([eye, maps] if first else [maps, eye], dim=2)


def outputs(x: DeltaChunks, entering: torch.Tensor, base: torch.Tensor | None = None) -> torch.Tensor:
    """O = Qe S + base per chunk [B, H, n, L, V] (unscaled), S the state entering each chunk;
    base None: P Ū (the outputs from the chunks' own tokens)."""
    return _mm_plus(x.half, x.PU if base is None else base, x.Qe, entering)


def entering_grads(x: DeltaChunks, do: torch.Tensor) -> torch.Tensor:
    """Qe^T dO [B, H, n, K, V]: each chunk's own gradient on the state entering it."""
    return _mm(x.half, _t(x.Qe), do)


def grad_carry(x: DeltaChunks, d_entering_local: torch.Tensor | None, d_final: torch.Tensor | None):
    """Backward of `carry`: the gradient on the state leaving each chunk [B, H, n, K, V] and on
    the one entering the first, given each chunk's own gradient on its entering state (Qe^T dO;
    None: zero) and the gradient on the final state (None: zero). Chunk by chunk or as a
    log-depth scan over the transposed maps, as `carry`."""
    d = x.zero_state() if d_final is None else d_final
    if scans_as_trees(x.q.device):
        own = torch.zeros_like(x.U_bar[..., :1, :].expand(*x.U_bar.shape[:3], *d.shape[-2:])) \
            if d_entering_local is None else d_entering_local
        after, d_initial = suffix_scan(torch.cat([own, d.unsqueeze(2)], dim=2),
                                       _with_identity(chunk_maps(x).transpose(-1, -2), first=False), dense=True)
        return after[:, :, :-1], d_initial
    own = (None,) * x.n_chunks if d_entering_local is None else d_entering_local.unbind(2)
    leaving = []
    for W, k_end, decay_end, local in reversed(list(zip(*map(x.per_chunk, ("W", "k_end", "decay_end")), own))):
        leaving.append(d)
        carried = d if decay_end is None else decay_end * d
        d = (carried if local is None else carried + local) - _t(W) @ (k_end @ d)
    return torch.stack(leaving[::-1], dim=2), d


def query_side_grads(x: DeltaChunks, do: torch.Tensor, entering: torch.Tensor):
    """The gradients that need only dO (already scaled) and the states: dQe, dP, dŪ and −dW
    before the carried state's gradient adds its share."""
    dQe = _mm(x.half, do, _t(entering))
    dP = _mm(x.half, dQe, _t(x.W), acc=_mm(x.half, do, _t(x.U_bar)), alpha=-1)
    dP.masked_fill_(~_tril(x.q.shape[3], do.device), 0.0)
    return dQe, dP, _mm(x.half, _t(x.P), do), _mm(x.half, _t(x.P), dQe)


def key_side_grads(x: DeltaChunks, entering: torch.Tensor, d_leaving: torch.Tensor, dQe, dP, dU_bar, neg_dW):
    """The rest of the backward, given the gradient on the state leaving each chunk: dq, dk
    [B, T, Hk, K], dv [B, T, Hv, V], dbeta [B, T, Hv] and the gate's gradient (None without
    one), in the compute dtype. (W's gradient travels negated: every sign lands on a small
    factor.)"""
    shape, L = x.shape, x.q.shape[3]
    U = _mm_plus(x.half, x.U_bar, x.W, entering, alpha=-1)  # Ū − W S
    dU = _mm(x.half, x.k_end, d_leaving)  # U = Ū − W S feeds the next state only
    neg_dW = _mm(x.half, dU, _t(entering), acc=neg_dW)  # −dW = P^T dQe + dU S^T
    dU_bar = dU_bar.add_(dU)
    dk_end = _mm(x.half, U, _t(d_leaving))
    neg_dR_W = _mm(x.half, _t(x.inverse), neg_dW)  # (I + A)^{-T} [−dW | dŪ]
    dR_U = _mm(x.half, _t(x.inverse), dU_bar)
    neg_dA = _mm(x.half, neg_dR_W, _t(x.W), acc=_mm(x.half, dR_U, _t(x.U_bar)), alpha=-1)
    neg_dA.masked_fill_(~_tril(L, x.q.device, -1), 0.0)
    b = x.beta.unsqueeze(-1)
    w_dot = (neg_dR_W * x.kg).sum(-1)  # −Σ_c dR_W ⊙ K̃
    a_dot = neg_dA * x.scores_kk  # −dA ⊙ (k k^T scores)
    dbeta = (dR_U * x.v).sum(-1) - w_dot - a_dot.sum(-1)
    dv = dR_U * b
    dD = neg_dA * (-b)  # the scores' gradient, dA_ts β_t
    dgamma = None
    if shape.decay == DECAY_CHANNEL:
        dq, dk_p, dgamma_p = _channel_scores_grads(dP, x.q, x.k, x.decay)
        dk_a, dk_b, dgamma_a = _channel_scores_grads(dD, x.k, x.k, x.decay)
        dk = dk_p.add_(dk_a).add_(dk_b)
    else:
        dZp, dZa = (dP, dD) if x.decay is None else (dP * x.decay, dD * x.decay)
        dq, dk = _mm(x.half, dZp, x.k), _mm(x.half, _t(dZp), x.q)
        _mm(x.half, dZa, x.k, acc=dk)
        _mm(x.half, _t(dZa), x.k, acc=dk)
    if x.to_start is None:
        dq.add_(dQe)
        dk.addcmul_(neg_dR_W, b, value=-1).add_(dk_end)
    else:
        dq.addcmul_(dQe, x.to_start)
        dk.addcmul_(neg_dR_W, -b * x.to_start).addcmul_(dk_end, x.to_end)
    if x.gamma is not None:
        end_dot = dk_end * x.k_end
        d_decay_end = (d_leaving * entering).sum(-1) * x.decay_end[..., 0]  # [.., K|1]: dΓ ⊙ Γ
        if shape.decay == DECAY_CHANNEL:
            dgamma = dgamma_p.add_(dgamma_a).addcmul_(dQe, x.qg).addcmul_(neg_dR_W * x.kg, -b).sub_(end_dot)
            dgamma_end = end_dot.sum(-2) + d_decay_end
        else:  # one gate per head: γ_t − γ_s enters the scores as a whole, so sum them by rows and columns
            scored = dP * x.P + dD * x.scores_kk
            dgamma = (scored.sum(-1) - scored.sum(-2) + (dQe * x.qg).sum(-1) - x.beta * w_dot
                      - end_dot.sum(-1))
            dgamma_end = end_dot.sum((-1, -2)) + d_decay_end.sum(-1)
        dgamma.select(3, -1).add_(dgamma_end)  # γ_L's gradient, on the chunk's last token
        dgamma = dgamma.flip(3).cumsum(3).flip(3)  # γ = cumsum(g) within the chunk
    dq, dk = (x.unchunk(t, t.dtype) for t in (dq, dk))
    if shape.group > 1:
        dq, dk = (t.unflatten(2, (shape.key_heads, shape.group)).sum(3) for t in (dq, dk))
    dv = x.unchunk(dv, dv.dtype)
    dbeta = x.unchunk(dbeta[..., None], dbeta.dtype)[..., 0]
    if dgamma is not None:
        dgamma = x.unchunk(dgamma if shape.decay == DECAY_CHANNEL else dgamma[..., None], dgamma.dtype)
        dgamma = dgamma if shape.decay == DECAY_CHANNEL else dgamma[..., 0]
    return dq, dk, dv, dbeta, dgamma
