"""Transition kinds: how a stretch of tokens carries the state that enters it.

Every causal recurrence here is S_t = A_t S_{t-1} + B_t, so a slot (a rank's stretch of the
sequence) is one affine map S_out = A S_in + h: A the product of its tokens' transitions, h the
state it produces from S_in = 0 (see shared design notes, "one form for every causal
recurrence"). The kinds differ only in how A is stored and multiplied:

    identity  no decay                      A = I             nothing travels
    scalar    one decay per head (and token) A = a I, a [.., 1]  1 value per head
    diagonal  per key channel (GLA)          A = Diag(a) [.., K] K values per head
    dense     the delta rule                 A [.., K, K]       K·K values per head

A transition `a` is a tensor [..., Kg] (None for the identity); states are [..., K, V]. Scans run
in the state precision (fp32, fp64 for fp64 inputs).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ops.checks import DECAY_CHANNEL, DECAY_HEAD, DECAY_NONE, DECAY_TOKEN
from ..ops.scan import prefix_scan, suffix_scan


@dataclass(frozen=True)
class Transition:
    """One kind of A. `per_key` marks a diagonal (K values per head) against a scalar."""

    name: str
    stored: bool  # False: the identity, nothing to store or send
    per_key: bool = False

    def width(self, key_dim: int) -> int:
        """Values per (sequence, head) that describe A: 0, 1 or K."""
        return 0 if not self.stored else (key_dim if self.per_key else 1)

    def apply(self, a: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
        """A S: a [..., Kg] scales the rows (key channels) of state [..., K, V]."""
        return state if a is None else a.unsqueeze(-1) * state

    def apply_transposed(self, a: torch.Tensor | None, state: torch.Tensor) -> torch.Tensor:
        """A^T S, which carries a gradient back across the stretch; A is diagonal here."""
        return self.apply(a, state)

    def compose(self, later: torch.Tensor | None, earlier: torch.Tensor | None) -> torch.Tensor | None:
        """The transition of `earlier` followed by `later`: A_later A_earlier."""
        return None if later is None else later * earlier

    def transposed(self, a: torch.Tensor | None) -> torch.Tensor | None:
        """A^T (a diagonal is its own transpose)."""
        return a

    def pack(self, a: torch.Tensor | None) -> list[torch.Tensor]:
        """The flat pieces A adds to a message (none for the identity)."""
        return [] if a is None else [a.reshape(-1)]

    def unpack(self, flat: torch.Tensor, lead: tuple[int, ...], key_dim: int) -> torch.Tensor | None:
        """Inverse of `pack` for a message holding A of shape [*lead, width]."""
        return None if not self.stored else flat.view(*lead, self.width(key_dim))

    def prefix(self, h: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        """Slots in sequence order, h [..., n, K, V], a [..., n, Kg] -> the state entering each
        slot: S_in(0) = 0, S_in(s+1) = A_s S_in(s) + h_s."""
        return prefix_scan(h, a)[0]

    def suffix(self, d: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        """Slots in sequence order, d [..., n, K, V] the gradient each slot's outputs put on its
        incoming state -> the gradient on each slot's outgoing state:
        dS_out(n-1) = 0, dS_out(s) = d_{s+1} + A_{s+1}^T dS_out(s+1)."""
        return suffix_scan(d, a)[0]


class DenseTransition(Transition):
    """A full K x K matrix per head (the delta rule: products of rank-one corrected diagonals);
    `a` is [..., K, K]; slot scans multiply (a loop of matmuls, or the log-depth tree, as the
    device policy says)."""

    def width(self, key_dim: int) -> int:
        return key_dim * key_dim

    def apply(self, a, state):
        return a @ state

    def apply_transposed(self, a, state):
        return a.transpose(-1, -2) @ state

    def compose(self, later, earlier):
        return later @ earlier

    def transposed(self, a):
        return a.transpose(-1, -2)

    def unpack(self, flat, lead, key_dim):
        return flat.view(*lead, key_dim, key_dim)

    def prefix(self, h, a):
        return prefix_scan(h, a, dense=True)[0]

    def suffix(self, d, a):
        return suffix_scan(d, a.transpose(-1, -2), dense=True)[0]


IDENTITY = Transition("identity", stored=False)
SCALAR = Transition("scalar", stored=True)
DIAGONAL = Transition("diagonal", stored=True, per_key=True)
DENSE = DenseTransition("dense", stored=True)

_BY_DECAY = {DECAY_NONE: IDENTITY, DECAY_HEAD: SCALAR, DECAY_TOKEN: SCALAR, DECAY_CHANNEL: DIAGONAL}


def transition_for(decay: str) -> Transition:
    """The transition kind of a log-decay form (see `lasp2.ops.checks.DECAY_KINDS`)."""
    return _BY_DECAY[decay]
