"""Backends behind the public ops; see :mod:`grpo_fused._dispatch` for how one is chosen."""
