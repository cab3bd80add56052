"""grpo-fused: fused GRPO-family loss kernels (Triton, C++) with an eager PyTorch reference."""

from setuptools import setup

setup(
    name="grpo-fused",
    version="0.1.0",
    description="Fused GRPO / DAPO / GSPO loss kernels: log-softmax gather, clipped surrogate, KL and "
    "reduction in one pass over the vocabulary, or straight from hidden states.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    # The Triton kernels live in the top-level folder kernels/ but install as grpo_fused.kernels:
    # a top-level import package named `kernels` would shadow Hugging Face's `kernels`.
    packages=["grpo_fused", "grpo_fused.backends", "grpo_fused.integrations", "grpo_fused.kernels"],
    package_dir={"grpo_fused.kernels": "kernels"},
    install_requires=["torch>=2.5", "numpy"],
    extras_require={
        "triton": ["triton>=3.2"],
        "test": ["pytest>=8", "trl==1.16.0", "triton>=3.2"],
        "bench": ["rich", "tqdm", "matplotlib", "pytest-benchmark"],
        "trl": ["trl>=1.16.0"],
    },
    entry_points={"console_scripts": ["grpo-fused=grpo_fused.cli:main"]},
)
