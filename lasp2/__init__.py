"""lasp2: sequence parallelism for linear-attention and hybrid language models."""
from .ops import chunk_delta_rule, chunk_linear_attn, naive_recurrent_delta_rule, naive_recurrent_linear_attn
from .parallel import SequenceParallel, lasp1_linear_attn, lasp2_delta_rule, lasp2_linear_attn
from .generation import generate  # noqa: E402 - the function; `python -m lasp2.generate` is the command

__version__ = "0.1.0"
__all__ = ["SequenceParallel", "chunk_delta_rule", "chunk_linear_attn", "generate", "lasp1_linear_attn", "lasp2_delta_rule",
           "lasp2_linear_attn", "naive_recurrent_delta_rule", "naive_recurrent_linear_attn"]
