"""The attention ops choose their own precision (states and scans in fp32 for half inputs,
outputs in the input dtype), so autocast must not recast the matmuls inside them."""
from __future__ import annotations

import contextlib
import functools

import torch


@contextlib.contextmanager
def autocast_disabled():
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.autocast("cpu", enabled=False))
        if torch.cuda.is_available():
            stack.enter_context(torch.autocast("cuda", enabled=False))
        yield


def without_autocast(fn):
    """Runs fn with autocast off (for public ops and autograd backward methods)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with autocast_disabled():
            return fn(*args, **kwargs)

    return wrapper
