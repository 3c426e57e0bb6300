"""Linear-Llama3: configs and presets, layers, the model. Takes an attention context; never
imports torch.distributed."""
from .config import DELTA_KINDS, LINEAR_KINDS, PRESETS, ModelConfig, pattern_for_ratio, preset
from .linear_llama import LinearLlama, LocalAttention, count_parameters

__all__ = ["DELTA_KINDS", "LINEAR_KINDS", "PRESETS", "LinearLlama", "LocalAttention", "ModelConfig", "count_parameters",
           "pattern_for_ratio", "preset"]
