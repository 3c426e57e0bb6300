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

A policy is picked once per call (`policy_for`) and kept for its backward.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Policy:
    name: str
    overlap: str  # "poll" or "fixed"
    keeps_costly_terms: bool

    @property
    def polls(self) -> bool:
        return self.overlap == "poll"


CPU = Policy("cpu", overlap="poll", keeps_costly_terms=True)
CUDA = Policy("cuda", overlap="fixed", keeps_costly_terms=False)
POLICIES = {"cpu": CPU, "cuda": CUDA}

_forced: contextvars.ContextVar[Policy | None] = contextvars.ContextVar("lasp2_policy", default=None)


@contextlib.contextmanager
def policy(device):
    """Within the block every call uses the policy of `device` ("cpu", "cuda", a torch.device or
    a Policy) whatever its tensors' device."""
    chosen = device if isinstance(device, Policy) else _by_name(torch.device(device).type)
    token = _forced.set(chosen)
    try:
        yield chosen
    finally:
        _forced.reset(token)


def policy_for(device: torch.device) -> Policy:
    """The forced policy, else the one for `device` (CUDA for GPUs, the CPU's otherwise)."""
    forced = _forced.get()
    return forced if forced is not None else _by_name(device.type)


def _by_name(device_type: str) -> Policy:
    return CUDA if device_type == "cuda" else CPU
