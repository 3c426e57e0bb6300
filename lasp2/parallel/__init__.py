"""Sequence parallelism: every function here takes this rank's shard and an explicit `group=`."""
from .allgather import allgather_attn, allgather_linear_attn
from .allscan import allscan_delta_rule, allscan_linear_attn
from .conv import causal_conv1d
from .counting import CollectiveLog, count_collectives
from .delta import lasp1_delta_rule, lasp2_delta_rule
from .lasp1 import lasp1_linear_attn
from .lasp2 import lasp2_linear_attn
from .layout import LAYOUTS, Layout, positions, shard, slot_table, unshard
from .logscan import logscan_delta_rule, logscan_linear_attn
from .registry import DELTA_METHODS, LINEAR_METHODS, SOFTMAX_METHODS, SequenceParallel, method_spec, method_table, register
from .ring import ring_attn, ring_linear_attn
from .spec import Comm, MethodSpec, Plan, Problem
from .ulysses import ulysses_attn, ulysses_delta_rule, ulysses_linear_attn

__all__ = [
    "DELTA_METHODS",
    "LAYOUTS",
    "LINEAR_METHODS",
    "Layout",
    "SOFTMAX_METHODS",
    "CollectiveLog",
    "Comm",
    "MethodSpec",
    "Plan",
    "Problem",
    "SequenceParallel",
    "allgather_attn",
    "allgather_linear_attn",
    "allscan_delta_rule",
    "allscan_linear_attn",
    "causal_conv1d",
    "count_collectives",
    "lasp1_delta_rule",
    "lasp1_linear_attn",
    "lasp2_delta_rule",
    "lasp2_linear_attn",
    "logscan_delta_rule",
    "logscan_linear_attn",
    "method_spec",
    "method_table",
    "positions",
    "register",
    "ring_attn",
    "ring_linear_attn",
    "shard",
    "slot_table",
    "ulysses_attn",
    "ulysses_delta_rule",
    "ulysses_linear_attn",
    "unshard",
]
