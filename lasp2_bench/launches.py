"""`python -m lasp2_bench launches`: the aten ops of one layer call, forward and backward, per
method and form, as the tokens per rank grow, under each device policy.

On a GPU every aten op that does work is a kernel launch (~5 µs), so a layer whose op count grows
with the sequence is bound by launches, not FLOPs. The count is taken by
`lasp2.ops.counting.count_dispatch` on every rank of a W-rank group, the largest reported: the
inputs are "meta" tensors and the group is torch's fake process group (collectives complete at
once and move nothing), so any length is counted in a second, with the same Python path as a
real run: no host reads, so no branch depends on values (tests/parallel/test_launches.py checks
the counts against real gloo runs). Views count too (they launch nothing on a GPU, so the counts
are an upper bound), and so does the unfused math that torch's scaled_dot_product_attention runs
on meta tensors where a CPU or GPU runs one fused kernel (the softmax op, all-gather and Ulysses:
their counts here are upper bounds, the same at every length). Under the CPU policy the engine polls the exchange, which here has always
arrived: its counts are those of an exchange that is never waited for.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn.functional as F

FORMS = {"linear": ("none", "head", "token", "channel"), "delta": ("deltanet", "gated_deltanet", "kda"),
         "softmax": ("causal",), "conv": ("silu",)}
DELTA_DECAY = {"deltanet": None, "gated_deltanet": "token", "kda": "channel"}
FIELDS = ["family", "form", "method", "policy", "packed", "layout", "world", "tokens_per_rank", "ops",
          "growth_per_8x"]


def add_arguments(p) -> None:
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 2048, 16384], help="tokens per rank")
    p.add_argument("--world", type=int, default=2, help="ranks of the (fake) group")
    p.add_argument("--policy", nargs="+", default=["cpu", "cuda"], choices=["cpu", "cuda"])
    p.add_argument("--layout", nargs="+", default=["contiguous"], choices=["contiguous", "zigzag"])
    p.add_argument("--packed", action="store_true", help="also count packed rows (four documents per rank)")
    p.add_argument("--family", nargs="+", default=list(FORMS), choices=list(FORMS))
    p.add_argument("--H", type=int, default=4, help="heads")
    p.add_argument("--D", type=int, default=32, help="head dim (K = V)")
    p.add_argument("--chunk-size", type=int, default=64)


def methods(family: str) -> dict:
    """name -> fn(inputs..., group=, layout=, cu_seqlens=) for "op" (the single-device op on the
    rank's tokens) and every registered method of the family."""
    from lasp2.ops import chunk_delta_rule, chunk_linear_attn
    from lasp2.ops.conv import causal_conv1d
    from lasp2.ops.softmax_attn import softmax_attn
    from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS
    from lasp2.parallel.conv import causal_conv1d as parallel_conv1d

    single = {"linear": lambda *a, group, layout, **kw: chunk_linear_attn(*a, **kw)[0],
              "delta": lambda *a, group, layout, **kw: chunk_delta_rule(*a, **kw)[0],
              "softmax": lambda *a, group, layout, **kw: softmax_attn(*a, **kw),
              "conv": lambda *a, group, layout, **kw: causal_conv1d(*a, **kw)}[family]
    registered = {"linear": LINEAR_METHODS, "delta": DELTA_METHODS, "softmax": SOFTMAX_METHODS,
                  "conv": {"sp": parallel_conv1d}}[family]
    return {"op": single, **{name: getattr(spec, "fn", spec) for name, spec in registered.items()}}


def accepts(family: str, form: str, method: str, heads: int, world: int) -> bool:
    from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS

    spec = {"linear": LINEAR_METHODS, "delta": DELTA_METHODS}.get(family, {}).get(method)
    if spec is None:
        return True
    decay = form if family == "linear" else (DELTA_DECAY[form] or "none")
    try:
        spec.check_rules(spec.name, decay, heads, heads, world)
    except ValueError:
        return False
    return True


def inputs(family: str, form: str, C: int, H: int, D: int, device) -> list:
    """The leaves of one layer call on C tokens (B = 1), requiring grad."""
    def leaf(*shape):
        return torch.randn(*shape, device=device).requires_grad_()

    if family == "conv":
        return [leaf(1, C, H * D), leaf(H * D, 4)]
    q, k, v = leaf(1, C, H, D), leaf(1, C, H, D), leaf(1, C, H, D)
    if family == "softmax":
        return [q, k, v]
    if family == "linear":
        shape = {"none": None, "head": (H,), "token": (1, C, H), "channel": (1, C, H, D)}[form]
        return [q, k, v, None if shape is None else F.logsigmoid(torch.randn(*shape, device=device)).requires_grad_()]
    decay = DELTA_DECAY[form]
    g = None if decay is None else F.logsigmoid(torch.randn(1, C, H, *((D,) if decay == "channel" else ()),
                                                             device=device)).requires_grad_()
    return [q, k, v, torch.sigmoid(torch.randn(1, C, H, device=device)).requires_grad_(), g]


def layer_ops(family, form, method, C, *, group, layout="contiguous", policy="cuda", packed=False, H=4, D=32,
              chunk_size=64, device="meta") -> int:
    """Aten ops of one forward and backward of `method` on this rank's C tokens."""
    from lasp2.ops import documents, policy as device_policy
    from lasp2.ops.counting import count_dispatch

    world = dist.get_world_size(group)
    fn = methods(family)[method]
    leaves = inputs(family, form, C, H, D, device)
    kwargs = {"group": group, "layout": layout}
    if family in ("linear", "delta"):
        kwargs["chunk_size"] = chunk_size
    if packed:  # four documents per rank's worth of tokens, checked once per batch (outside the count)
        T = C * (world if method != "op" else 1)
        kwargs["cu_seqlens"] = documents(torch.arange(0, T + 1, max(1, C // 4), dtype=torch.int64))
    with device_policy(policy), count_dispatch() as log:
        o = fn(*leaves, **kwargs)
        o.sum().backward()
    return log.op_count()


@contextlib.contextmanager
def fake_group(rank: int, world: int):
    """torch's fake process group as the default group, for one rank."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("cpu:fake,meta:fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def run(tokens=(256, 2048, 16384), world=2, policies=("cpu", "cuda"), layouts=("contiguous",), packed=(False, True),
        H=4, D=32, chunk_size=64, families=tuple(FORMS)) -> list[dict]:
    counts: dict = {}
    for rank in range(world):
        with fake_group(rank, world) as group:
            for family in families:
                for method in methods(family):
                    for form in FORMS[family]:
                        if not accepts(family, form, method, H, world):
                            continue
                        for policy, layout, docs, C in ((p, lay, d, c) for p in policies for lay in layouts
                                                        for d in packed for c in tokens):
                            if method == "op" and layout != layouts[0]:
                                continue
                            key = (family, form, method, policy, docs, layout, C)
                            n = layer_ops(family, form, method, C, group=group, layout=layout, policy=policy,
                                          packed=docs, H=H, D=D, chunk_size=chunk_size)
                            counts[key] = max(counts.get(key, 0), n)
    rows = []
    for (family, form, method, policy, docs, layout, C), n in counts.items():
        smaller = counts.get((family, form, method, policy, docs, layout, C // 8))
        rows.append(dict(family=family, form=form, method=method, policy=policy, packed=docs, layout=layout,
                         world=world, tokens_per_rank=C, ops=n, growth_per_8x=None if smaller is None else n / smaller))
    return rows


def print_table(rows, stream) -> None:
    """One line per (family, form, method, packed, layout): each policy's ops at every length and
    the largest growth per 8x tokens."""
    tokens = sorted({r["tokens_per_rank"] for r in rows})
    policies = list(dict.fromkeys(r["policy"] for r in rows))
    by = {}
    for r in rows:
        by.setdefault((r["family"], r["form"], r["method"], r["packed"], r["layout"]), {})[
            (r["policy"], r["tokens_per_rank"])] = r
    head = "| family | form | method | rows | " + " | ".join(
        f"{p} C={c}" for p in policies for c in tokens) + " | " + " | ".join(f"{p} max ×/8x" for p in policies) + " |"
    print(head, file=stream)
    print("|" + "---|" * (4 + len(policies) * (len(tokens) + 1)), file=stream)
    for (family, form, method, docs, layout), cells in by.items():
        counts = [str(cells[(p, c)]["ops"]) for p in policies for c in tokens]
        growth = []
        for p in policies:
            ratios = [cells[(p, c)]["growth_per_8x"] for c in tokens if cells[(p, c)]["growth_per_8x"] is not None]
            growth.append(f"{max(ratios):.2f}" if ratios else "-")
        rows_kind = ("packed" if docs else "rows") + ("" if layout == "contiguous" else f" {layout}")
        print(f"| {family} | {form} | {method} | {rows_kind} | " + " | ".join(counts) + " | " + " | ".join(growth)
              + " |", file=stream)
