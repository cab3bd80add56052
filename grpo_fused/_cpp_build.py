"""Loads the C++ extension: the prebuilt ``grpo_fused._C`` if present, else a just-in-time build.

The JIT build compiles ``csrc/*.cpp`` with ninja through :func:`torch.utils.cpp_extension.load`
into torch's extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
once per source/flag change; later processes reuse the cached library. Nothing is built at
import time: the first call that needs the extension builds it (about a minute on 2 cores).
Both builds use the same portable flags (:func:`compile_flags`) and carry every CPU variant of
the row kernels; ``torch.ops.grpo_fused_cpp.cpu_capability()`` names the one in use.

If neither works (no compiler, no ninja, a failed build), :func:`unavailable_reason` says why
and the dispatcher falls back to the eager reference. ``GRPO_FUSED_DISABLE_CPP=1`` turns the
extension off on purpose.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import importlib
import logging
import os
import sys
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


def compile_flags() -> List[str]:
    """C++ flags of both builds (setup.py and just in time): portable, no CPU-specific ``-m`` flag.

    The row kernels are compiled once per instruction set inside the build (``csrc/kernels_*.cpp``
    switch the compiler to AVX2 / AVX-512 with ``#pragma GCC target``) and the widest one the CPU
    has is picked at run time, so a library built anywhere runs at full speed everywhere, and one
    built here still loads on an older CPU. ``-march=native`` would instead make a library that
    crashes on an older CPU sharing the cache directory, and a wheel that is slow on a newer one.
    """
    # -ffp-contract=off: no implicit fused multiply-add, so a kernel rounds where its source says
    # (csrc/row_math.h writes its FMAs out) and the variants differ only there.
    return ["-O3", "-fopenmp", "-DNDEBUG", "-Wno-psabi", "-ffp-contract=off"]


def sources() -> List[str]:
    return sorted(glob.glob(os.path.join(CSRC_DIR, "*.cpp")))


def _headers_digest() -> str:
    """A digest of ``csrc/*.h``. torch's JIT cache is keyed on the ``.cpp`` files and the flags only,
    so an edited header (the row kernels live in ``row_math.h`` and ``sampling_support.h``) would
    leave a stale library loaded; the digest travels as an otherwise unused define."""
    digest = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(CSRC_DIR, "*.h"))):
        digest.update(os.path.basename(path).encode())
        with open(path, "rb") as f:
            digest.update(f.read())
    return digest.hexdigest()[:16]


def _jit_build() -> None:
    from torch.utils import cpp_extension

    srcs = sources()
    if not srcs:
        raise RuntimeError(f"no C++ sources found under {CSRC_DIR} (an installed wheel without csrc/)")
    cflags = compile_flags() + [f"-DGRPO_FUSED_HEADERS_DIGEST={_headers_digest()}"]
    # torch's cache key covers sources and flags, not the torch version: a library built against
    # another torch in the same cache directory would fail to load, so the version is in the name.
    # One library serves every CPU (run-time dispatch), so the name carries no CPU variant.
    torch_tag = "".join(c if c.isalnum() else "_" for c in torch.__version__)
    name = "grpo_fused_cpp_torch" + torch_tag
    # torch's own place for it (root / py311_cpu / name), named here so the guard below can sit in it.
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    build_dir = os.path.join(root, f"py{sys.version_info.major}{sys.version_info.minor}_cpu", name)
    os.makedirs(build_dir, exist_ok=True)
    _log.info("grpo_fused: building the C++ extension %s (once; cached by torch.utils.cpp_extension)", name)
    with _build_guard(build_dir):
        cpp_extension.load(
            name=name,
            sources=srcs,
            extra_cflags=cflags,
            extra_ldflags=["-fopenmp"],
            extra_include_paths=[CSRC_DIR],
            build_directory=build_dir,
            is_python_module=False,
            verbose=os.environ.get("GRPO_FUSED_BUILD_VERBOSE") == "1",
        )


@contextlib.contextmanager
def _build_guard(build_dir: str):
    """One build at a time in ``build_dir``, under a lock the kernel frees when its holder dies.

    torch's own guard is a plain ``lock`` file that a build killed part way (Ctrl-C, a timeout, an
    out-of-memory kill) leaves behind, and every later process then waits on it forever, without a
    word. Holding this lock, no other build of ours is under way, so a ``lock`` file still there is
    such a leftover and is removed before torch looks at it.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's guard alone
        yield
        return
    with open(os.path.join(build_dir, "grpo_fused_build.lock"), "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(build_dir, "lock"))
            yield
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


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
