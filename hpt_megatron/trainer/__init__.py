"""Megatron training engine: build, micro-batching, forward/backward with a pluggable loss,
optimizer step, distributed checkpoints."""
