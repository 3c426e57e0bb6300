"""Choosing the next token from a step's logits: greedy, or sampled with a temperature and top-k."""
from __future__ import annotations

import torch


def token_chooser(*, do_sample: bool = False, temperature: float = 1.0, top_k: int | None = None, seed: int | None = None,
                  device=None):
    """-> choose(logits [B, vocab]) -> tokens [B]: the argmax (greedy; the first on ties, as
    torch.argmax), or a draw from softmax(logits / temperature) restricted to the top_k largest,
    from a generator seeded with `seed` (None: torch's default generator). Raises ValueError
    naming a bad temperature or top_k."""
    if not do_sample:
        return lambda logits: logits.argmax(dim=-1)
    if not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature must be a number > 0, got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    generator = None if seed is None else torch.Generator(device=device or "cpu").manual_seed(seed)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        scaled = logits.float() / temperature
        if top_k is not None and top_k < scaled.shape[-1]:
            kth = scaled.topk(top_k, dim=-1).values[..., -1:]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        return torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)[:, 0]

    return choose
