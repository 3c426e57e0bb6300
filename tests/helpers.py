"""Inputs and comparisons shared by the tests."""
from __future__ import annotations

import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import lasp2

DECAY_FORMS = ("none", "head", "token", "channel")
LASP2_SOURCES = str(Path(lasp2.__file__).parent)


def make_inputs(kind: str, B=2, T=37, H=3, K=6, V=5, dtype=torch.float64, seed=0, strong=False) -> dict:
    """q, k, v and a log decay of the given form (None, [H], [B, T, H], [B, T, H, K]), all <= 0.

    strong=True mixes log decays of -20 with ordinary ones, to test for inf/nan and underflow.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    shape = {"none": None, "head": (H,), "token": (B, T, H), "channel": (B, T, H, K)}[kind]
    g = None
    if shape is not None:
        g = F.logsigmoid(randn(*shape) + 2.0)  # mostly mild decay, a few strong
        if strong:
            g = torch.where(torch.rand(*shape, generator=gen, dtype=torch.float64) < 0.5, torch.full_like(g, -20.0), g)
    out = {"q": randn(B, T, H, K), "k": randn(B, T, H, K), "v": randn(B, T, H, V), "g": g}
    return {name: None if t is None else t.to(dtype) for name, t in out.items()}


def run_example(name: str, ranks: int = 2, timeout: float = 300):
    """examples/<name> under torchrun on `ranks` CPU processes -> the finished process (asserted
    to have exited 0)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--standalone",
           str(root / "examples" / name)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"examples/{name}" in (root / "README.md").read_text()
    return done


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in float64 (the norm-ratio tolerance)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def leaf(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().clone().requires_grad_(True)


class MatmulOperands(TorchDispatchMode):
    """Records every bmm / baddbmm as (both operands hold bf16 values only, "file:function" of
    the innermost lasp2 frame that issued it)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    @property
    def bf16_exact(self) -> list[bool]:
        return [exact for exact, _ in self.calls]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            a, b = (args[0], args[1]) if func.overloadpacket is torch.ops.aten.bmm else (args[1], args[2])
            exact = all(bool((t == t.bfloat16().to(t.dtype)).all()) for t in (a, b))
            frames = [f for f in traceback.extract_stack() if f.filename.startswith(LASP2_SOURCES)]
            self.calls.append((exact, f"{Path(frames[-1].filename).name}:{frames[-1].name}" if frames else "?"))
        return func(*args, **(kwargs or {}))
