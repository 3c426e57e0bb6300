"""The attention ops choose their own precision (states and scans in fp32 for half inputs,
outputs in the input dtype), so autocast must not recast the matmuls inside them."""
from __future__ import annotations

import functools

import torch


def without_autocast(fn):
    """Runs fn with autocast off (for public ops and autograd backward methods). Plain `with`
    blocks, which torch.compile traces without a graph break."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            if torch.cuda.is_available():
                with torch.autocast("cuda", enabled=False):
                    return fn(*args, **kwargs)
            return fn(*args, **kwargs)

    return wrapper
