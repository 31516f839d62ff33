"""Engines execute shards on one device: `SimEngine` (modelled durations in wall time); vLLM comes next."""
