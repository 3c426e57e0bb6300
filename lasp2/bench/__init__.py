"""Benchmarks and the scaling model: `python -m lasp2.bench {attn,model,project}` (also `lasp2-bench`)."""
