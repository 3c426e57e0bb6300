"""Sequence parallelism: every function here takes this rank's shard and an explicit `group=`."""
from .counting import CollectiveLog, count_collectives
from .lasp1 import lasp1_linear_attn
from .lasp2 import lasp2_linear_attn

__all__ = ["CollectiveLog", "count_collectives", "lasp1_linear_attn", "lasp2_linear_attn"]
