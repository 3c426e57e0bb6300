"""The device policy: how the same math is scheduled on a CPU and on a GPU.

    with lasp2.ops.policy("cuda"):      # the GPU schedule, forced (e.g. to test it on the CPU)
        o = lasp2_linear_attn(q, k, v, g, group=sp_group)

Without a forced policy each call follows its tensors' device. Both policies compute the same
math to the same tolerances; they differ only in what suits the device:

    overlap   how the state-passing methods overlap their exchange with local work.
              "poll" (CPU): compute tiles of the intra-chunk output until the exchange reports
              that it has arrived, then finish the remaining tiles fused with the inter-chunk
              term while they are in cache. gloo's Work.is_completed() is exact, so the host
              knows when the states are there.
              "fixed" (CUDA): issue the collective, enqueue every piece of independent work, then
              wait. NCCL's is_completed() reports GPU completion while the host runs ahead of the
              GPU, so polling would make the kernel sequence depend on timing; a fixed,
              stream-ordered schedule lets the collective's stream and the compute stream overlap
              on the device.

    keeps_costly_terms
              what the delta rule keeps for its backward beyond its inputs and per-chunk states.
              True (CPU): the chunk terms made by matmuls and the triangular solve (W, Ū, P,
              Qe, the inverse, the key scores; fp32, about 7 values per token and head for
              K = V = 64), recomputing only layout copies and element-wise factors; matmuls set
              the CPU's time. False (CUDA): nothing more, the backward recomputes them from the
              inputs (as FLA's kernels do): a GPU's matmuls are cheap next to its memory.
              Either way nothing is kept outside save_for_backward, so activation checkpointing
              frees all of it, and no fp32 copy of a bf16 input is kept.

    scan      how states are carried across the chunks of a sequence (and across ranks):
              "blocked" (CPU): scans of element-wise steps, ~2·sqrt(N) of them in two levels for
              diagonal transitions, one per chunk for the delta rule's dense K x K one (no
              transition matrix is formed); "tree" (CUDA): a log-depth scan (pairs combined, then
              split back: 2·log2(N) levels of a few batched ops each), for every transition kind,
              the delta rule's included (its chunks' K x K maps formed and composed by batched
              matmuls), so that the kernels launched do not grow with the sequence.

    tile_values, tile_scores
              how much of a sequence one pass of batched ops covers. tile_values: values of one
              chunk-layout tensor per tile of chunks (CPU: 2^18, 1 MB in fp32, so that a tile's
              ~10 tensors stay in cache, where 64 x 64 matmuls run ~1.5x faster); None: the
              whole sequence in one tile (CUDA: a GPU wants few, large launches). tile_scores:
              attention scores per query tile of the quadratic pieces (the softmax and
              left-product blocks; CPU 2^25 (128 MB fp32), CUDA 2^30 (4 GB): launches stay
              constant until one block's scores exceed it).

    half_matmuls
              the precision of the chunk matmuls for bf16/fp16 inputs. False (CPU): every matmul
              in fp32 (a CPU has no faster half matmul). True (CUDA): linear attention keeps its
              chunked q, k, v in the input dtype and runs each matmul with half operands (a
              state or an fp32 factor rounded to the input dtype, as FLA's kernels do) and fp32
              accumulation and result (tensor cores); the delta rule rounds both operands of
              each chunk matmul the same way (its fields stay fp32 for the element-wise work);
              decay factors, the delta rule's solve, states and scans stay fp32.
              On a CPU the forced policy emulates it exactly (operands rounded to the half
              dtype, then multiplied in fp32).

A policy is picked once per call (`policy_for`) and kept for its backward: the autograd
functions record it (`ctx.policy`) and run their backward under it (`under_forward_policy`),
wherever `backward()` is called.
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Policy:
    name: str
    overlap: str  # "poll" or "fixed"
    keeps_costly_terms: bool
    scan: str  # "blocked" or "tree"
    tile_values: int | None
    tile_scores: int
    half_matmuls: bool

    def __post_init__(self):
        if self.overlap not in ("poll", "fixed"):
            raise ValueError(f"Policy.overlap must be 'poll' or 'fixed', got {self.overlap!r}")
        if self.scan not in ("blocked", "tree"):
            raise ValueError(f"Policy.scan must be 'blocked' or 'tree', got {self.scan!r}")
        if self.tile_values is not None and not (isinstance(self.tile_values, int) and self.tile_values > 0):
            raise ValueError(f"Policy.tile_values must be a positive int or None, got {self.tile_values!r}")
        if not (isinstance(self.tile_scores, int) and self.tile_scores > 0):
            raise ValueError(f"Policy.tile_scores must be a positive int, got {self.tile_scores!r}")

    @property
    def polls(self) -> bool:
        return self.overlap == "poll"

    @property
    def tree_scans(self) -> bool:
        return self.scan == "tree"


CPU = Policy("cpu", overlap="poll", keeps_costly_terms=True, scan="blocked", tile_values=1 << 18, tile_scores=1 << 25,
             half_matmuls=False)
CUDA = Policy("cuda", overlap="fixed", keeps_costly_terms=False, scan="tree", tile_values=None, tile_scores=1 << 30,
              half_matmuls=True)
POLICIES = {"cpu": CPU, "cuda": CUDA}


class _Forced:
    """The policy forced by the innermost `policy(...)` block, for the whole process. A plain
    attribute rather than a context variable: torch.compile reads it while tracing and guards
    on it (a forced policy recompiles, leaving it recompiles back), where it cannot trace a
    ContextVar."""

    policy: Policy | None = None


_FORCED = _Forced()


@contextlib.contextmanager
def policy(device):
    """Within the block every call uses the policy of `device` ("cpu", "cuda", a torch.device or
    a Policy) whatever its tensors' device. Blocks nest; the choice holds for the whole process
    (every thread) while the block runs."""
    chosen = device if isinstance(device, Policy) else _by_name(torch.device(device).type)
    outer, _FORCED.policy = _FORCED.policy, chosen
    try:
        yield chosen
    finally:
        _FORCED.policy = outer


def policy_for(device: torch.device) -> Policy:
    """The forced policy, else the one for `device` (CUDA for GPUs, the CPU's otherwise)."""
    forced = _FORCED.policy
    return forced if forced is not None else _by_name(device.type)


def _by_name(device_type: str) -> Policy:
    return CUDA if device_type == "cuda" else CPU


def under_forward_policy(backward):
    """Decorates an autograd Function's backward: it runs under `ctx.policy`, the policy its
    forward recorded, even where `backward()` is called outside the forward's `policy` block.
    (Compiled, the backward is traced with the forward, under the same policy.)"""

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.compiler.is_compiling():
            return backward(ctx, *grads)
        with policy(ctx.policy):
            return backward(ctx, *grads)

    return wrapper
