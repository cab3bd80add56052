"""Loads the C++ extension: the prebuilt ``grpo_fused._C`` if present, else a just-in-time build.

The JIT build compiles ``csrc/*.cpp`` with ninja through :func:`torch.utils.cpp_extension.load`
into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
once per source/flag change; later processes reuse the cached library. Nothing is built at
import time: the first call that needs the extension builds it (about a minute on 2 cores).

If neither works (no compiler, no ninja, a failed build), :func:`unavailable_reason` says why
and the dispatcher falls back to the eager reference. ``GRPO_FUSED_DISABLE_CPP=1`` turns the
extension off on purpose.
"""

from __future__ import annotations

import glob
import importlib
import logging
import os
import platform
import threading
from typing import List, Optional

import torch

_log = logging.getLogger(__name__)
_lock = threading.Lock()
_state = {"loaded": False, "reason": None}

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# An installed wheel ships the sources as package data (grpo_fused/csrc); a checkout has them
# at the top level (csrc/), which is also where an editable install finds them.
CSRC_DIR = next(
    (d for d in (os.path.join(_PACKAGE_DIR, "csrc"), os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc"))
     if os.path.isdir(d)),
    os.path.join(os.path.dirname(_PACKAGE_DIR), "csrc"),
)


def _cpu_flags() -> List[str]:
    """AVX2/FMA/F16C code when this CPU has them (read from /proc/cpuinfo on Linux x86-64).

    ``-march=native`` would do the same but makes a library that crashes on an older CPU sharing
    the same cache directory; the flags are also part of the extension's name, so each variant
    gets its own cache entry.
    """
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    if {"avx2", "fma", "f16c"} <= set(flags):
        return ["-mavx2", "-mfma", "-mf16c"]
    return []


def compile_flags(native: bool = True) -> List[str]:
    """C++ flags of both builds; ``native=False`` (setup.py) leaves out CPU-specific ones."""
    flags = ["-O3", "-fopenmp", "-DNDEBUG", "-Wno-psabi"]
    return flags + (_cpu_flags() if native else [])


def sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC_DIR, "*.cpp")))


def _jit_build() -> None:
    from torch.utils import cpp_extension

    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no C++ sources found under {CSRC_DIR} (an installed wheel without csrc/)")
    cflags = compile_flags(native=True)
    # torch's cache key covers sources and flags, not the torch version: a library built against
    # another torch in the same cache directory would fail to load, so the version is in the name.
    torch_tag = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    name = "grpo_fused_cpp" + ("_avx2" if "-mavx2" in cflags else "") + "_torch" + torch_tag
    _log.info("grpo_fused: building the C++ extension %s (once; cached by torch.utils.cpp_extension)", name)
    cpp_extension.load(
        name=name,
        sources=srcs,
        extra_cflags=cflags,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[CSRC_DIR],
        is_python_module=False,
        verbose=os.environ.get("GRPO_FUSED_BUILD_VERBOSE") == "1",
    )


def _load() -> None:
    if os.environ.get("GRPO_FUSED_DISABLE_CPP") == "1":
        raise RuntimeError("GRPO_FUSED_DISABLE_CPP=1")
    try:
        importlib.import_module("grpo_fused._C")
        return
    except ImportError:
        pass
    _jit_build()


def unavailable_reason() -> Optional[str]:
    """None once the extension's ops are registered (building it if needed), else why not."""
    if _state["loaded"]:
        return None
    if _state["reason"] is not None:
        return _state["reason"]
    with _lock:
        if not _state["loaded"] and _state["reason"] is None:
            try:
                _load()
                torch.ops.grpo_fused_cpp.logits_fwd  # noqa: B018  (raises if the library did not register)
                _state["loaded"] = True
            except Exception as exc:  # any build failure means "fall back", with the reason shown once
                first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                _state["reason"] = f"the C++ extension could not be built or loaded: {first_line}"
    return _state["reason"]
