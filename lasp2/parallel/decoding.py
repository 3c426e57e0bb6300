"""Sequence-parallel prefill, then decoding one token at a time from O(1) states.

The prompt runs once across the ranks, as in training, through a `PromptState`'s prefill
context: every linear and delta-rule layer returns the state after the whole prompt (LASP-2
combines it from the summaries it gathers anyway; `MethodSpec.final_state`), every short
convolution its last w−1 inputs (from the tails it gathers anyway), the same on every rank; every
softmax layer keeps the keys and values of this rank's tokens, 1/W of the prompt's KV cache.

Each decoded token then runs on every rank (the same token, the same weights): the recurrences
and convolutions step their states locally (`lasp2.ops.decode`), and each softmax layer attends
the new query to this rank's shard of the cache and merges the W partial results by their
log-sum-exp in fp32 (one all-gather of B·Hq·(Dv + 1) values per layer and token). The decoded
tokens' keys and values go to the ranks in turn (token i to rank i mod W), so the cache stays
spread evenly.

The contexts have `SequenceParallel`'s interface (`linear_attn`, `delta_rule`,
`causal_conv1d`, `softmax_attn`); a model's layers call them in the same order every forward,
and that order is how a call finds its layer's state.
"""
from __future__ import annotations

import dataclasses
import time

import torch

from ..ops.checks import compute_dtype
from ..ops.decode import conv_step, delta_rule_step, linear_attn_step
from ..ops.softmax_attn import attention_block
from .comm import all_gather_dim0, broadcast, group_rank_size
from .layout import as_layout
from .registry import AUTO, final_state_methods
from .spec import DELTA, LINEAR


class _Calls:
    """Counts a forward's calls of each kind: the i-th call of a kind is the i-th such layer."""

    cu_seqlens = None  # one sequence per row

    def __init__(self, state: "PromptState"):
        self.state, self.sp, self.rank = state, state.sp, state.rank
        self._seen = {"recurrent": 0, "conv": 0, "softmax": 0}

    def _next(self, kind: str) -> int:
        index = self._seen[kind]
        self._seen[kind] += 1
        return index

    @staticmethod
    def _one_causal_sequence(fn: str, cu_seqlens, causal: bool = True) -> None:
        if cu_seqlens is not None:
            raise ValueError(f"{fn}: generation runs one prompt per row; packed documents (cu_seqlens) are not supported")
        if not causal:
            raise ValueError(f"{fn}: generation needs causal layers (causal=False has no next token)")


class _Prefill(_Calls):
    """The prompt across the ranks: `sp`'s methods, keeping what decoding continues from."""

    def linear_attn(self, q, k, v, log_decay=None, causal=True, scale=None, cu_seqlens=None):
        self._one_causal_sequence("prefill linear_attn", cu_seqlens, causal)
        o, final = self.sp.linear_attn(q, k, v, log_decay, causal=True, scale=scale, output_final_state=True)
        self.state.recurrent.append(final)
        return o

    def delta_rule(self, q, k, v, beta, log_decay=None, scale=None, cu_seqlens=None):
        self._one_causal_sequence("prefill delta_rule", cu_seqlens)
        o, final = self.sp.delta_rule(q, k, v, beta, log_decay, scale=scale, output_final_state=True)
        self.state.recurrent.append(final)
        return o

    def causal_conv1d(self, x, weight, bias=None, activation="silu", cu_seqlens=None):
        self._one_causal_sequence("prefill causal_conv1d", cu_seqlens)
        out, tail = self.sp.causal_conv1d(x, weight, bias, activation=activation, output_final_state=True)
        self.state.conv.append(tail)
        return out

    def softmax_attn(self, q, k, v, causal=True, scale=None, cu_seqlens=None):
        self._one_causal_sequence("prefill softmax_attn", cu_seqlens, causal)
        self.state.add_shard(k, v)
        return self.sp.softmax_attn(q, k, v, causal=True, scale=scale)


class _Step(_Calls):
    """One decoded token (the same on every rank): states step locally, softmax layers merge the
    ranks' shards of the cache."""

    def __init__(self, state: "PromptState", owner: int):
        super().__init__(state)
        self.owner = owner  # the rank that keeps this token's keys and values

    def linear_attn(self, q, k, v, log_decay=None, causal=True, scale=None, cu_seqlens=None):
        self._one_causal_sequence("decoding linear_attn", cu_seqlens, causal)
        i = self._next("recurrent")
        o, self.state.recurrent[i] = linear_attn_step(q, k, v, log_decay, self.state.recurrent[i], scale=scale)
        return o

    def delta_rule(self, q, k, v, beta, log_decay=None, scale=None, cu_seqlens=None):
        self._one_causal_sequence("decoding delta_rule", cu_seqlens)
        i = self._next("recurrent")
        o, self.state.recurrent[i] = delta_rule_step(q, k, v, beta, log_decay, self.state.recurrent[i], scale=scale)
        return o

    def causal_conv1d(self, x, weight, bias=None, activation="silu", cu_seqlens=None):
        self._one_causal_sequence("decoding causal_conv1d", cu_seqlens)
        i = self._next("conv")
        out, self.state.conv[i] = conv_step(x, self.state.conv[i], weight, bias, activation)
        return out

    def softmax_attn(self, q, k, v, causal=True, scale=None, cu_seqlens=None):
        self._one_causal_sequence("decoding softmax_attn", cu_seqlens, causal)
        i = self._next("softmax")
        if self.rank == self.owner:
            self.state.append(i, k, v)
        keys, values = self.state.cached(i)
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        no_positions = torch.zeros(0, dtype=torch.long, device=q.device)  # every cached key is earlier: no mask
        o, lse = attention_block(q, keys, values, no_positions, no_positions, causal=False, scale=scale)
        return merge_shards(o, lse, self.sp.group).to(q.dtype)


def merge_shards(o: torch.Tensor, lse: torch.Tensor, group) -> torch.Tensor:
    """The attention over every rank's keys from each rank's (o [B, T, H, Dv], lse [B, T, H]) over
    its own, in fp32 (fp64 for fp64): one all-gather; the same sum, in rank order, on every rank."""
    if group_rank_size(group)[1] == 1:
        return o
    packed = torch.cat([o, lse.unsqueeze(-1)], dim=-1)
    parts = all_gather_dim0(packed.unsqueeze(0).contiguous(), group)  # [W, B, T, H, Dv + 1]
    o_all, lse_all = parts[..., :-1], parts[..., -1]
    total = torch.logsumexp(lse_all, dim=0)
    weights = torch.exp(lse_all - total).unsqueeze(-1)
    return (weights * o_all).sum(dim=0)


@dataclasses.dataclass
class CacheBytes:
    """What one rank holds while decoding: the softmax layers' keys and values (its shard), the
    recurrent states and the convolutions' last inputs (every rank the same)."""

    kv_cache: int
    states: int
    conv: int

    @property
    def total(self) -> int:
        return self.kv_cache + self.states + self.conv


class PromptState:
    """The state of every layer after a prompt and the tokens decoded so far, on this rank.

    `prefill()` is the context for the prompt's forward (this rank's shard, over `sp`);
    `step()` the context for each decoded token's forward (one token, on every rank).
    `room` bounds the decoded tokens (the keys and values are kept in buffers sized once).
    """

    def __init__(self, sp, room: int):
        self.sp, self.room = sp, room
        self.rank, self.world = group_rank_size(sp.group)
        self.recurrent: list[torch.Tensor] = []  # [B, H, K, V] per linear / delta-rule layer
        self.conv: list[torch.Tensor] = []  # [B, w−1, D] per short convolution
        self._keys: list[torch.Tensor] = []  # [B, capacity, Hkv, D] per softmax layer, this rank's
        self._values: list[torch.Tensor] = []
        self._filled: list[int] = []
        self.decoded = 0

    def prefill(self) -> _Prefill:
        return _Prefill(self)

    def step(self) -> _Step:
        """The context of the next decoded token; its keys and values go to rank (i mod W)."""
        owner = self.decoded % self.world
        self.decoded += 1
        return _Step(self, owner)

    def add_shard(self, k: torch.Tensor, v: torch.Tensor) -> None:
        """A softmax layer's keys and values of this rank's prompt tokens, with room for its
        share of the decoded ones."""
        capacity = k.shape[1] + -(-self.room // self.world)
        keys = k.new_empty(k.shape[0], capacity, *k.shape[2:])
        values = v.new_empty(v.shape[0], capacity, *v.shape[2:])
        keys[:, :k.shape[1]], values[:, :v.shape[1]] = k, v
        self._keys.append(keys)
        self._values.append(values)
        self._filled.append(k.shape[1])

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        at = self._filled[layer]
        if at + k.shape[1] > self._keys[layer].shape[1]:
            raise ValueError(f"PromptState: more decoded tokens than the room for {self.room}")
        self._keys[layer][:, at:at + k.shape[1]] = k
        self._values[layer][:, at:at + v.shape[1]] = v
        self._filled[layer] = at + k.shape[1]

    def cached(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's keys and values of a softmax layer so far."""
        n = self._filled[layer]
        return self._keys[layer][:, :n], self._values[layer][:, :n]

    def nbytes(self) -> CacheBytes:
        """The bytes held now: the filled keys and values, the states and the conv tails."""
        kv = sum(self.cached(i)[0].nbytes + self.cached(i)[1].nbytes for i in range(len(self._keys)))
        return CacheBytes(kv, sum(s.nbytes for s in self.recurrent), sum(t.nbytes for t in self.conv))


@dataclasses.dataclass
class Generation:
    """generate(..., return_dict=True): the prompt and new tokens [B, T + n], the logits of
    every decoded step [B, n, vocab] (fp32, fp64 for an fp64 model), the seconds of the prefill and of each decoded
    token, and the cache this rank held at the end."""

    sequences: torch.Tensor
    logits: torch.Tensor
    prefill_seconds: float
    step_seconds: list[float]
    cache: CacheBytes


def check_prompt(fn: str, sp, input_ids, max_new_tokens: int, attention_mask=None, ragged_tail: bool = False) -> int:
    """Raises ValueError naming the problem (on every rank alike, before any collective);
    returns how many of the prompt's tokens the prefill shards (all of them, or with
    ragged_tail the most the layout can)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"{fn}: input_ids must be an integer tensor [B, T], got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"{fn}: max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError(f"{fn}: padded prompts are not supported (attention_mask has zeros): give rows of one length "
                         f"(or one row per call)")
    for family, name in ((LINEAR, sp.linear), (DELTA, sp.delta)):
        able = final_state_methods(family)
        if name != AUTO and name not in able:  # auto picks among them
            raise ValueError(f"{fn}: the prefill needs each {family} layer's final state, which {name!r} cannot "
                             f"return; use a state-passing method ({', '.join(able)} or auto)")
    lay = as_layout(sp.layout, sp.world, fn)
    length = input_ids.shape[1]
    sharded = length - length % lay.n_slots if ragged_tail else length
    if sharded == 0:
        raise ValueError(f"{fn}: a prompt of {length} tokens is shorter than the {lay.n_slots} slots of the {lay} layout "
                         f"over {sp.world} ranks: give at least {lay.n_slots} tokens")
    if length % lay.n_slots and not ragged_tail:
        raise ValueError(f"{fn}: a prompt of {length} tokens cannot be sharded over {sp.world} ranks in the {lay} "
                         f"layout: its length must be a multiple of {lay.n_slots} (ragged_tail=True runs the last "
                         f"tokens as decoding steps)")
    return sharded


def _last_token(sp, length: int, device) -> tuple[int, torch.Tensor]:
    """(the rank holding the prompt's last token, that token's index in each rank's shard: the
    owner's own, the same slot's last token elsewhere)."""
    lay = as_layout(sp.layout, sp.world)
    owner = lay.slot_ranks()[-1]
    slot_len = length // lay.n_slots
    mine = lay.slots(sp.rank)
    index = mine.index(lay.n_slots - 1) if sp.rank == owner else len(mine) - 1
    return owner, torch.tensor([(index + 1) * slot_len - 1], device=device)


def _broadcast(t: torch.Tensor, source: int, group) -> torch.Tensor:
    return broadcast(t, group, source) if group_rank_size(group)[1] > 1 else t


def _at_least_fp32(logits: torch.Tensor) -> torch.Tensor:
    return logits.to(compute_dtype(logits.dtype))


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate_tokens(forward, sp, input_ids, max_new_tokens: int, choose, *, eos_token_id=None, pad_token_id=None,
                    attention_mask=None, ragged_tail: bool = False, return_dict: bool = False, fn: str = "generate"):
    """The prompt prefilled across `sp`'s ranks, then `max_new_tokens` tokens decoded.

    forward(tokens [B, C], position_ids [C], ctx, logits_at [1]) -> logits [B, 1, vocab]: the
    model's call with a context and the local index whose logits it needs. choose(logits
    [B, vocab], fp32 or wider) -> tokens [B]. Every rank passes the same prompt; rank 0's choice is
    broadcast each step, so every rank returns the same tokens. With eos_token_id, a row that
    produced it is filled with pad_token_id (default: eos) and decoding stops once every row has.
    ragged_tail: see `check_prompt`. -> tokens [B, T + n], or a `Generation` (return_dict).
    """
    sharded = check_prompt(fn, sp, input_ids, max_new_tokens, attention_mask, ragged_tail)
    b, length = input_ids.shape
    device = input_ids.device
    state = PromptState(sp, max_new_tokens + length - sharded)

    def step(tokens: torch.Tensor, position: int) -> torch.Tensor:
        at = torch.zeros(1, dtype=torch.long, device=device)
        return _at_least_fp32(forward(tokens, torch.full((1,), position, device=device), state.step(), at)[:, -1])

    started = time.perf_counter()
    owner, at = _last_token(sp, sharded, device)
    prompt = input_ids[:, :sharded]
    logits = _at_least_fp32(forward(sp.shard(prompt), sp.positions(sharded, device=device), state.prefill(), at)[:, -1])
    logits = _broadcast(logits, owner, sp.group)
    for position in range(sharded, length):  # the ragged tail, a token at a time
        logits = step(input_ids[:, position:position + 1], position)
    if return_dict:  # timings asked for (otherwise no host sync)
        _synchronize(device)
    prefill_seconds = time.perf_counter() - started
    sequences, seen, steps = [input_ids], [], []
    done = torch.zeros(b, dtype=torch.bool, device=device)
    fill = eos_token_id if pad_token_id is None else pad_token_id
    for i in range(max_new_tokens):
        started = time.perf_counter()
        if i:  # the previous token through every layer, one token on every rank
            logits = step(sequences[-1], length + i - 1)
        seen.append(logits)
        token = _broadcast(choose(logits).to(input_ids.dtype), 0, sp.group)
        if eos_token_id is not None:
            token = torch.where(done, torch.full_like(token, fill), token)
            done = done | (token == eos_token_id)
        sequences.append(token[:, None])
        if return_dict:
            _synchronize(device)
        steps.append(time.perf_counter() - started)
        if eos_token_id is not None and bool(done.all()):
            break
    tokens = torch.cat(sequences, dim=1)
    if not return_dict:
        return tokens
    stacked = torch.stack(seen, dim=1) if seen else logits.new_zeros(b, 0, logits.shape[-1])
    return Generation(tokens, stacked, prefill_seconds, steps, state.nbytes())
