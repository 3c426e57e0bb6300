"""Jobs run on the distributed test ranks (module level, so they can be sent to workers)."""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from torch.utils._python_dispatch import TorchDispatchMode

from lasp2.ops import naive_recurrent_linear_attn
from lasp2.ops import policy as device_policy
from lasp2.ops.policy import POLICIES
from lasp2.parallel import count_collectives, lasp1_linear_attn, lasp2_linear_attn
from lasp2.parallel.allscan import allscan_linear_attn
from lasp2.parallel.logscan import logscan_linear_attn
from tests.helpers import leaf

METHODS = {"lasp2": lasp2_linear_attn, "lasp1": lasp1_linear_attn, "allscan": allscan_linear_attn,
           "logscan": logscan_linear_attn}


def even_bounds(T: int, world: int) -> list[tuple[int, int]]:
    return [(r * T // world, (r + 1) * T // world) for r in range(world)]


def shard_inputs(inputs: dict, lo: int, hi: int) -> dict:
    """This rank's leaves: a [H] decay is shared by every rank, the rest is sliced."""
    out = {}
    for name, t in inputs.items():
        if t is None:
            out[name] = None
        elif name == "g" and t.dim() == 1:
            out[name] = leaf(t)
        else:
            out[name] = leaf(t[:, lo:hi])
    return out


def run_shard(group, method, inputs, do, bounds, causal=True, scale=0.9, chunk_size=16, validate=False):
    """Forward and backward of this rank's shard; returns its output and gradients."""
    lo, hi = bounds[dist.get_rank(group)]
    x = shard_inputs(inputs, lo, hi)
    o = METHODS[method](x["q"], x["k"], x["v"], x["g"], scale=scale, causal=causal, group=group,
                        chunk_size=chunk_size, validate=validate)
    o.backward(do[:, lo:hi])
    grads = {f"d{n}": None if t is None else t.grad for n, t in x.items()}
    return {"o": o.detach(), **grads}


def run_shard_in_tiles(group, tile_values, policy, *args, **kwargs):
    """run_shard with the kernels' tiles bounded to `tile_values` values per tensor (a few chunks),
    under the device policy `policy`."""
    with device_policy(with_tiles(policy, tile_values)):
        return run_shard(group, *args, **kwargs)


def with_tiles(policy: str, tile_values: int | None):
    """The device policy `policy` ("cpu" or "cuda") with tiles of `tile_values` values per
    tensor (None: the policy's own)."""
    chosen = POLICIES[policy]
    return chosen if tile_values is None else dataclasses.replace(chosen, tile_values=tile_values)


def single_device(inputs, do, causal=True, scale=0.9):
    """The reference: the fp64 token-by-token recurrence over the whole sequence (an oracle that
    shares no code with the chunked kernels). A [H] decay is expanded to [B, T, H] so that each
    rank's share of its gradient can be read off its slice."""
    x = {n: None if t is None else t.double() for n, t in inputs.items()}
    if x["g"] is not None and x["g"].dim() == 1:
        B, T = x["q"].shape[:2]
        x["g"] = x["g"].expand(B, T, -1)
    x = {n: leaf(t) for n, t in x.items()}
    o, _ = naive_recurrent_linear_attn(x["q"], x["k"], x["v"], x["g"], scale=scale, causal=causal)
    o.backward(do.double())
    return {"o": o.detach(), **{f"d{n}": None if t is None else t.grad for n, t in x.items()}}


def reference_slice(ref: dict, name: str, lo: int, hi: int, head_decay: bool):
    t = ref[name][:, lo:hi]
    return t.sum(dim=(0, 1)) if name == "dg" and head_decay else t


def count_passes(group, method, inputs, bounds, causal=True, validate=False):
    """The collectives this rank issues in the forward and in the backward."""
    lo, hi = bounds[dist.get_rank(group)]
    x = shard_inputs(inputs, lo, hi)
    with count_collectives() as forward:
        o = METHODS[method](x["q"], x["k"], x["v"], x["g"], causal=causal, group=group, validate=validate)
    with count_collectives() as backward:
        o.sum().backward()
    return {"forward": forward.rows(), "backward": backward.rows()}


class _Overlap(TorchDispatchMode):
    """Watches the ops of a pass: after each collective or receive is issued, how many matmuls
    run before the first op that reads what it brought (its output buffer)."""

    def __init__(self):
        super().__init__()
        self.waiting = {}  # data_ptr of a buffer still in flight -> [kind, matmuls since]
        self.done = []  # (kind, matmuls that ran while it travelled)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [t for a in list(args) + list(kwargs.values()) for t in (a if isinstance(a, (list, tuple)) else [a])
                   if isinstance(t, torch.Tensor)]
        if func.namespace != "c10d":
            for t in tensors:
                entry = self.waiting.pop(t.untyped_storage().data_ptr(), None)
                if entry is not None:
                    self.done.append(tuple(entry))
            if func._opname in ("bmm", "baddbmm", "baddbmm_", "mm", "addmm", "matmul"):
                for entry in self.waiting.values():
                    entry[1] += 1
        elif func._opname in ("_allgather_base_", "recv_"):
            self.waiting[tensors[0].untyped_storage().data_ptr()] = [func._opname, 0]
        return func(*args, **kwargs)


def overlap_order(group, method, inputs, bounds, layout="contiguous", policy="cpu", tile_values=None, late_rank=None):
    """For each pass of a state-passing method on this rank: (collective or receive, matmuls
    that ran while it was in flight), in the order their results were first read; under the
    device policy `policy`, with tiles of `tile_values` values (None: the default) and the rank
    `late_rank` (None: none) starting each pass 0.2 s late."""
    import time

    lo, hi = bounds[dist.get_rank(group)]
    x = shard_inputs(inputs, lo, hi)
    late = dist.get_rank(group) == late_rank
    with device_policy(with_tiles(policy, tile_values)):
        time.sleep(0.2 if late else 0.0)
        with _Overlap() as forward:
            o = METHODS[method](x["q"], x["k"], x["v"], x["g"], group=group, layout=layout)
        time.sleep(0.2 if late else 0.0)
        with _Overlap() as backward:
            o.sum().backward()
    return {"forward": forward.done, "backward": backward.done}


class _PointToPoint(TorchDispatchMode):
    """Records a pass's sends and receives in the order issued: (kind, peer, matmuls run after
    it within the pass)."""

    def __init__(self):
        super().__init__()
        self.events = []  # [kind, peer, matmuls after]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func._opname in ("send", "recv_"):
            self.events.append([func._opname.rstrip("_"), int(args[2]), 0])
        elif func._opname in ("bmm", "baddbmm", "baddbmm_", "mm", "addmm", "matmul"):
            for event in self.events:
                event[2] += 1
        return func(*args, **(kwargs or {}))


def point_to_point_order(group, method, inputs, layout, causal=True):
    """For each pass of a method on this rank's layout shard: [(send|recv, peer's global rank,
    matmuls that ran after it was issued)] in issue order."""
    from lasp2.parallel import LINEAR_METHODS, shard

    x = {n: None if t is None else leaf(t if (n == "g" and t.dim() == 1) else shard(t, group, layout))
         for n, t in inputs.items()}
    with _PointToPoint() as forward:
        o = LINEAR_METHODS[method].fn(x["q"], x["k"], x["v"], x["g"], causal=causal, group=group, layout=layout)
    with _PointToPoint() as backward:
        o.sum().backward()
    return {"forward": [tuple(e) for e in forward.events], "backward": [tuple(e) for e in backward.events]}


def call_and_catch(group, method, per_rank_inputs, validate, causal_per_rank=None):
    """Calls the method with this rank's own inputs; returns (error type, message, collectives
    issued) instead of raising, so the pool stays usable."""
    rank = dist.get_rank(group)
    x = per_rank_inputs[rank]
    causal = True if causal_per_rank is None else causal_per_rank[rank]
    with count_collectives() as log:
        try:
            METHODS[method](x["q"], x["k"], x["v"], x.get("g"), causal=causal, group=group, validate=validate)
        except (TypeError, ValueError) as exc:
            return type(exc).__name__, str(exc), log.count()
    return None, None, log.count()


def run_under(group, policy, job, *args):
    """job(group, *args) (a module-level job, forward and backward) under the device policy
    `policy`."""
    with device_policy(policy):
        return job(group, *args)


def run_registered(group, family, method, inputs, do, layout, causal=True, validate=False):
    """Any registered method on this rank's layout shard; returns output, gradients, positions."""
    from lasp2.parallel import LINEAR_METHODS, SOFTMAX_METHODS, positions, shard

    x = {n: None if t is None else leaf(t if (n == "g" and t.dim() == 1) else shard(t, group, layout))
         for n, t in inputs.items()}
    do_local = shard(do, group, layout)
    if family == "linear":
        o = LINEAR_METHODS[method].fn(x["q"], x["k"], x["v"], x["g"], scale=0.9, causal=causal, group=group,
                                   chunk_size=16, layout=layout, validate=validate)
    else:
        o = SOFTMAX_METHODS[method].fn(x["q"], x["k"], x["v"], causal=causal, scale=0.7, group=group,
                                    layout=layout, validate=validate)
    o.backward(do_local)
    grads = {f"d{n}": None if t is None else t.grad for n, t in x.items()}
    return {"o": o.detach(), **grads, "positions": positions(do.shape[1], group, layout)}


def rejected(group, *args):
    """`run_registered` expected to refuse its inputs: -> (error type, message, collectives
    issued before it), caught here so that the pool of ranks stays up."""
    with count_collectives() as log:
        try:
            run_registered(group, *args)
        except (TypeError, ValueError) as exc:
            return type(exc).__name__, str(exc), log.count()
    return None, None, log.count()


def softmax_reference(inputs, do, causal=True, scale=0.7):
    """fp64 softmax attention written out (KV heads repeated for GQA), with its gradients."""
    x = {n: leaf(t.double()) for n, t in inputs.items() if t is not None}
    q, k, v = x["q"], x["k"], x["v"]
    group = q.shape[2] // k.shape[2]
    kk, vv = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
    scores = torch.einsum("bihd,bjhd->bhij", q, kk) * scale
    if causal:
        T = q.shape[1]
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhij,bjhd->bihd", scores.softmax(dim=-1), vv)
    o.backward(do.double())
    return {"o": o.detach(), "dq": q.grad, "dk": k.grad, "dv": v.grad, "dg": None}


def count_registered(group, family, method, inputs, layout, causal=True):
    """The collectives one registered method issues per pass on this rank."""
    from lasp2.parallel import LINEAR_METHODS, SOFTMAX_METHODS, shard

    x = {n: None if t is None else leaf(t if (n == "g" and t.dim() == 1) else shard(t, group, layout))
         for n, t in inputs.items()}
    fn = (LINEAR_METHODS if family == "linear" else SOFTMAX_METHODS)[method].fn
    extra = {"log_decay": x["g"]} if family == "linear" else {}
    with count_collectives() as forward:
        o = fn(x["q"], x["k"], x["v"], causal=causal, group=group, layout=layout, **extra)
    with count_collectives() as backward:
        o.sum().backward()
    return {"forward": forward.rows(), "backward": backward.rows()}


def layout_roundtrip(group, x, layout):
    """This rank's shard, its positions, and unshard(shard(x))."""
    from lasp2.parallel import positions, shard, unshard

    local = shard(x, group, layout)
    return {"shard": local, "positions": positions(x.shape[1], group, layout), "roundtrip": unshard(local, group, layout)}


def call_registered_and_catch(group, family, method, per_rank_inputs, layout, validate):
    """A registered method on this rank's own (already local) inputs; returns (error type,
    message, collectives issued) instead of raising."""
    from lasp2.parallel import LINEAR_METHODS, SOFTMAX_METHODS

    x = per_rank_inputs[dist.get_rank(group)]
    with count_collectives() as log:
        try:
            if family == "linear":
                LINEAR_METHODS[method].fn(x["q"], x["k"], x["v"], x.get("g"), group=group, layout=layout, validate=validate)
            else:
                SOFTMAX_METHODS[method].fn(x["q"], x["k"], x["v"], group=group, layout=layout, validate=validate)
        except (TypeError, ValueError) as exc:
            return type(exc).__name__, str(exc), log.count()
    return None, None, log.count()


def train_job(group, argv, mesh):
    """Runs lasp2.train.train on this rank; mesh is "single" (one process) or a name in
    tests.dist_workers.MESH_SHAPES (e.g. "sp2": ranks 0, 1 as sp; "dp2sp2": ranks 0-3, sp pairs
    {0,1}, {2,3}). Returns the losses and the whole (unsharded) parameters."""
    import io

    from torch.distributed.tensor import DTensor

    from lasp2.distributed import ParallelDims
    from lasp2.train import parse_config, train
    from tests.dist_workers import mesh_of

    dims = ParallelDims() if mesh == "single" else ParallelDims(*mesh_of(mesh))
    result = train(parse_config(argv), dims, stream=io.StringIO())
    params = {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
              for n, p in result["model"].named_parameters()}
    return {"losses": result["losses"], "val_loss": result["val_loss"], "params": params}
