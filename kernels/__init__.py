"""Triton kernels of grpo-fused, installed as ``grpo_fused.kernels``.

Importing this package needs Triton. The kernels run on CUDA tensors, and on CPU tensors
under ``TRITON_INTERPRET=1`` (slowly; the test suite uses small shapes there).
"""
