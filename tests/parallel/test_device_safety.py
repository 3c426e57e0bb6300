"""What a GPU needs of a layer call, checked on the CPU.

Tensors on the inputs' device: every tensor a call creates (the cross-rank check of
validate=True included, which NCCL takes only on the GPU) follows its inputs, checked by running
each method with CPU inputs while the default device is "meta" (a factory call that forgets
`device=` then makes a meta tensor, and the call fails).

No host reads inside a layer call: on a GPU each one is a device sync, so a model whose layers
read values back stalls once per layer. For every method (and the short convolution), W = 2,
both layouts, with and without packed documents, a forward and backward of one layer call read
nothing back (`lasp2.ops.counting`: Tensor.item/tolist/__bool__/__int__ and the aten ops
nonzero, equal, _local_scalar_dense, ...). Packed documents are checked once per batch, before
the layers (`Documents`, as `SequenceParallel.with_documents` does); a plain cu_seqlens tensor
costs exactly one read per call. The single-device ops alike."""
import pytest
import torch

from lasp2.ops import chunk_delta_rule, chunk_linear_attn, documents
from lasp2.ops.conv import causal_conv1d
from lasp2.ops.counting import count_dispatch
from lasp2.ops.softmax_attn import softmax_attn
from lasp2.parallel import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS
from lasp2.parallel.conv import causal_conv1d as parallel_conv1d
from tests.helpers import leaf
from tests.parallel.test_documents import DOCUMENTS, FAMILIES, T, _call, _inputs

DECAY = {"linear": "token", "delta": "channel", "softmax": "none"}


def layer_call(group, family, method, layout, packed, validate=False):
    """One layer call of this rank's shard, forward and backward, in the context given by
    `within` (see the jobs below)."""
    from lasp2.parallel import shard

    x = _inputs(family, DECAY[family])
    local = {n: None if t is None else leaf(shard(t, group, layout)) for n, t in x.items()}
    docs = documents(torch.tensor(DOCUMENTS["edges"])) if packed else None  # once per batch
    weight = torch.randn(local["v"][0, 0].numel(), 4, dtype=torch.float64)

    def run():
        if method == "conv":
            o = parallel_conv1d(local["v"].flatten(2), weight, group=group, layout=layout, cu_seqlens=docs)
        else:
            o = _call(family, FAMILIES[family][method].fn, local, group=group, layout=layout, cu_seqlens=docs,
                      chunk_size=4, validate=validate)
        o.sum().backward()

    return run


def host_reads(group, family, method, layout, packed):
    """The host reads of one layer call, forward and backward, on this rank."""
    run = layer_call(group, family, method, layout, packed)
    with count_dispatch() as log:
        run()
    return log.host_reads


def on_the_inputs_device(group, family, method, layout, packed):
    """One layer call with validate=True (the cross-rank check too) while the default device is
    "meta": it completes only if every tensor it makes follows its inputs' device."""
    run = layer_call(group, family, method, layout, packed, validate=True)
    with torch.device("meta"):
        run()
    return True


METHODS = [(family, method) for family in ("linear", "delta", "softmax") for method in FAMILIES[family]] + [
    ("delta", "conv")]


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("family,method", METHODS)
def test_a_layer_call_reads_nothing_back(dist_workers, family, method, layout, packed):
    for rank, reads in dist_workers.run(host_reads, (0, 1), family, method, layout, packed).items():
        assert reads == [], (rank, reads)


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("family,method", METHODS)
def test_a_layer_call_makes_its_tensors_on_its_inputs_device(dist_workers, family, method, packed):
    assert all(dist_workers.run(on_the_inputs_device, (0, 1), family, method, "zigzag", packed).values())


def test_every_registered_method_is_counted():
    registered = {(f, m) for f, methods in (("linear", LINEAR_METHODS), ("delta", DELTA_METHODS),
                                            ("softmax", SOFTMAX_METHODS)) for m in methods}
    assert registered <= set(METHODS)


def _single_device(family, cu):
    """-> run(): one single-device op call, forward and backward (inputs made here, now)."""
    x = {n: leaf(t) for n, t in _inputs("delta" if family == "conv" else family, DECAY.get(family, "none")).items()
         if t is not None}
    weight = torch.randn(x["v"][0, 0].numel(), 4, dtype=torch.float64)
    fn = {"linear": chunk_linear_attn, "delta": chunk_delta_rule, "softmax": softmax_attn}.get(family)

    def run():
        if family == "conv":
            o = causal_conv1d(x["v"].flatten(2), weight, cu_seqlens=cu)
        else:
            o = _call(family, fn, {"g": None, **x}, cu_seqlens=cu, **({} if family == "softmax" else {"chunk_size": 4}))
        o = o[0] if isinstance(o, tuple) else o
        o.sum().backward()
        return o

    return run


@pytest.mark.parametrize("family", ["linear", "delta", "softmax", "conv"])
def test_single_device_ops_read_once_per_tensor_and_never_with_documents(family):
    cu = torch.tensor(DOCUMENTS["edges"])
    docs = documents(cu)  # once per batch
    run = _single_device(family, docs)
    with count_dispatch() as log:
        run()
    assert log.host_reads == []
    run = _single_device(family, cu)
    with count_dispatch() as log:
        run()
    assert log.host_reads == ["Tensor.tolist"]  # the offsets, once


def test_the_counter_sees_every_kind_of_host_read():
    t = torch.tensor([1.0, 0.0, 2.0])
    with count_dispatch() as log:
        t.tolist(), t[0].item(), bool(t[0]), int(t[2]), float(t[1]), torch.nonzero(t), torch.equal(t, t)
    assert log.host_reads == ["Tensor.tolist", "Tensor.item", "Tensor.__bool__", "Tensor.__int__",
                              "Tensor.__float__", "aten.nonzero", "aten.equal"]
    assert log.ops["nonzero"] == 1 and log.op_count() > 5


@pytest.mark.parametrize("packed", [False, True], ids=["rows", "packed"])
@pytest.mark.parametrize("family", ["linear", "delta", "softmax", "conv"])
def test_single_device_ops_make_their_tensors_on_their_inputs_device(family, packed):
    run = _single_device(family, documents(torch.tensor(DOCUMENTS["edges"])) if packed else None)
    with torch.device("meta"):
        assert run().device.type == "cpu"
