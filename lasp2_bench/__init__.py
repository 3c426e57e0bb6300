"""Benchmarks and the scaling model: `python -m lasp2_bench {attn,model,project}` (also `lasp2-bench`)."""
