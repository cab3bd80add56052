"""grpo-fused: fused GRPO-family loss kernels (Triton, C++) with an eager PyTorch reference."""

import glob
import importlib.util
import os

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cpp_extension_kwargs():
    """Build grpo_fused._C now when torch is importable here (pip install --no-build-isolation).

    Otherwise (the usual isolated build, which must never download a second torch) nothing is
    compiled: grpo_fused builds csrc/ just in time on first use and caches it. Set
    GRPO_FUSED_NO_BUILD_EXT=1 to skip this build. The flags are portable and the same as the JIT
    build's: the row kernels are compiled for the baseline, AVX2 and AVX-512 inside the library
    and chosen at run time (csrc/cpu_dispatch.cpp), so this build is as fast as a native one.
    """
    if os.environ.get("GRPO_FUSED_NO_BUILD_EXT") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:
        return {}
    # The flags live in the JIT loader; load that file alone (the package imports far more).
    spec = importlib.util.spec_from_file_location("_grpo_fused_cpp_build", os.path.join(HERE, "grpo_fused", "_cpp_build.py"))
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    flags = loader.compile_flags()
    sources = sorted(os.path.relpath(p, HERE) for p in glob.glob(os.path.join(HERE, "csrc", "*.cpp")))
    extension = CppExtension(
        "grpo_fused._C",
        sources,
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args=flags,
        extra_link_args=["-fopenmp"],
    )
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


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
    # csrc/ ships as package data too, so that an installed wheel can build the C++
    # extension just in time when it was not compiled at install.
    # benchmarks/ installs as grpo_fused.benchmarks (its top-level modules: the harness behind
    # `grpo-fused bench`, the per-op scripts, the static report), so the CLI reaches it from a wheel;
    # its pytest-benchmark suite (benchmarks/suite) and stored results stay in the checkout.
    packages=["grpo_fused", "grpo_fused.semantics", "grpo_fused.backends", "grpo_fused.integrations",
              "grpo_fused.trainer", "grpo_fused.kernels", "grpo_fused.csrc", "grpo_fused.benchmarks"],
    package_dir={"grpo_fused.kernels": "kernels", "grpo_fused.csrc": "csrc", "grpo_fused.benchmarks": "benchmarks"},
    package_data={"grpo_fused.csrc": ["*.cpp", "*.h", "README.md"]},
    install_requires=["torch>=2.5", "numpy", "ninja"],
    extras_require={
        "triton": ["triton>=3.2"],
        # The suite runs every optional part: TRL parity, the Triton interpreter, the CLI's
        # plots and tables, and the trainer (transformers comes with TRL).
        "test": ["pytest>=8", "pytest-timeout", "trl==1.16.0", "peft", "triton>=3.2", "matplotlib", "rich", "tqdm"],
        # triton: the static sm_90a report of the main job compiles with its bundled ptxas (no GPU needed).
        "bench": ["rich", "tqdm", "matplotlib", "pytest-benchmark", "triton>=3.2"],
        "train": ["transformers", "matplotlib", "tqdm"],
        "trl": ["trl>=1.16.0"],
    },
    entry_points={"console_scripts": ["grpo-fused=grpo_fused.cli:main"]},
    **cpp_extension_kwargs(),
)
