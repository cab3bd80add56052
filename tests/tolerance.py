"""The one tolerance rule of the backend tests.

Every backend result is compared with a float64 ground truth (the reference run in float64 on
the same, already rounded, inputs), and its error may not exceed the error eager PyTorch makes
on the same inputs in the test dtype, plus ``k`` ulps of the output dtype:

    max |actual - truth|  <=  max |eager - truth|  +  k * eps(dtype) * scale

* ``eager`` is the same quantity computed the way a trainer computes it today (TRL, verl): the
  :mod:`grpo_fused.reference` functions run on inputs of the test dtype, i.e. fp32 token math
  for bf16 / fp16 / fp32 logits, gradients rounded to the input dtype. Its error is the price
  of the dtype; a backend may pay it, not more. Without an eager baseline (a float64 run,
  where eager and truth are the same computation) the first term is 0.
* ``eps(dtype)`` is ``torch.finfo(dtype).eps`` of the *output*: an fp32 logp of bf16 logits is
  an fp32 value, a gradient is in its input's dtype. ``ulp_dtype`` names another dtype where
  a backend documents that it computes in one (the tiled linear strategy runs fp64 in fp32).
* ``scale`` is ``max(floor, max |truth|)`` over the tensor, or a tensor that broadcasts against
  it (``row_scale``) where magnitudes differ by row (a row of logits offset by +1000 has an fp32
  rounding floor 1000x that of its neighbours). The eager error is then taken per block of
  that scale too (per row), so one extreme row does not lend its error budget to the others.
  ``floor`` is 1 for values (logps, entropies, losses, metrics: the rounding of an O(1) number
  is the least error anyone makes) and 0 for the gradients of a loss, which are small by
  construction (a mean over tokens): with a floor of 1, a bf16 gradient entry of 0.05 could be
  15% off. Gradients of O(1) upstream weights keep the floor of 1, where the true gradient can
  be exactly 0 (V = 1) and a kernel's is rounding noise of the upstream's size.
* ``k`` is chosen per quantity and output dtype (``ULPS_*`` below) from the errors the backends
  really make (``needed_ulps``); it must stay small enough that the assertion can fail: a result
  off by 1e-3 relative fails it wherever the dtype can represent such a change (fp32, fp64
  results; a bf16 / fp16 gradient scaled by 1 + 2^-5 fails it, 1 + 1e-3 is below bf16's
  resolution), except where the value is 0 or, with a floor of 1, far below 1.

Beyond the bound: shapes must be equal; NaN must sit exactly where the truth has NaN
(``equal_nan`` semantics), infinities must be equal; the actual dtype must be ``dtype`` (or, by
default, the eager result's dtype: a backend returns what PyTorch returns). The failure message
states the ``k`` that would have been needed, so a k is re-derived from a failure, not guessed.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch

Tensor = torch.Tensor

__all__ = ["ULPS_ADVANTAGE", "ULPS_GRAD", "ULPS_LOSS", "ULPS_VALUE", "assert_close_to_truth", "dlogits_scale",
           "logit_row_scale", "needed_ulps", "row_scale", "ulp"]

# k per quantity and output dtype. A float64 run has no eager term (eager is the truth's own
# computation), so its k holds every difference of summation order; an fp32 result computed as
# eager computes it needs a few ulps beyond eager's error; a bf16 / fp16 result is an fp32 value
# rounded once (Triton's interpreter truncates: up to 1 ulp where round-to-nearest takes 1/2).
# Each k is 3-6x the largest need measured (needed_ulps, worst case in brackets) over the C++
# backend, the Triton kernels under the interpreter and the distributed module, at 8f31c23 and
# f6b8766, leaving room for GPU math (fast exp / log, other summation orders) not measured here.
ULPS_VALUE = {  # per-token logp, lse, entropy (scale: the row's largest |z|, or max(1, max |value|))
    torch.float64: 32,  # [10.5: the C++ entropy of a V = 5003 row]
    torch.float32: 4,  # [2.0: C++ logps at 8f31c23, 1.2 since]
}
ULPS_LOSS = {  # the loss and its metrics: means over tokens and sequences
    torch.float64: 16,  # [6.5: C++ luspo loss]
    torch.float32: 16,  # [5.2: Triton linear loss, cispo two-sided]
}
ULPS_GRAD = {  # logits gradients, and linear ones outside the Triton linear path (which sets its own)
    torch.float64: 64,  # [31.7: C++ dlogits, V = 5003]
    torch.float32: 8,  # [2.4: Triton dlogits, k3 without bias correction]
    torch.bfloat16: 1,  # [0.84: Triton dlogits, truncated]: one rounding of an fp32 value
    torch.float16: 1,  # [0.0]
}
ULPS_ADVANTAGE = {  # group advantages and statistics
    torch.float64: 4,  # [1.3: C++ batch-scaled advantages]
    torch.float32: 4,  # [0.9: Triton advantages, fp16 rewards]
}


def ulp(dtype: torch.dtype) -> float:
    """``eps`` of ``dtype``: the spacing of floats in [1, 2)."""
    return torch.finfo(dtype).eps


def row_scale(x: Tensor, dim: int = -1, *, keepdim: bool = True, floor: float = 1.0) -> Tensor:
    """``max(floor, max |x|)`` over ``dim``, non-finite entries ignored: the scale of a per-row
    bound. ``x`` is the truth itself, or the input of a row computation (the logits / T of a
    log-softmax row, whose largest |z| sets the fp32 rounding floor of that row's lse)."""
    t = _as_double(x)
    t = torch.where(torch.isfinite(t), t.abs(), torch.zeros_like(t))
    return t.amax(dim, keepdim=keepdim).clamp(min=floor)


def logit_row_scale(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per row of ``logits`` ``(..., V)``, ``max(1, max |z|)`` with ``z = logits / T``, shape ``(...)``:
    the size of the numbers whose rounding bounds the row's lse, logp and entropy (a row offset
    by +1000 errs 100x more than a row of logits ~10, eager PyTorch's as well as a kernel's)."""
    return row_scale(_as_double(logits) / temperature, keepdim=False)


def dlogits_scale(truth_grad: Tensor, logits: Tensor, temperature: float = 1.0, *, floor: float = 0.0,
                  upstream: Optional[Tensor] = None) -> Tensor:
    """The scale of a logits gradient ``(..., V)``. Its fp32 / fp64 computation errs relative to
    the row's upstream gradient (``|dL/dlogp| + |dL/dH| (1 + H)`` over T, where a test knows it;
    otherwise ``max(floor, max |dlogits|)`` over the whole tensor: a row whose softmax is
    saturated has tiny entries but the cancellation error of 1 - p, relative to its upstream
    gradient) times the row's ``max(1, max |z|)``: p = exp(z - lse) carries the rounding of z and
    lse (:func:`logit_row_scale`). A bf16 / fp16 gradient is that fp32 value rounded once,
    relative to each entry's own size: the scale is then per entry, ``|dlogits| + r * row
    scale`` with ``r`` such that ``ULPS_GRAD[dtype]`` ulps of it are one ulp of the entry plus
    ``ULPS_GRAD[float32]`` fp32 ulps of the row scale, and the eager error is taken per entry
    too, as Cut Cross-Entropy's tests do."""
    if upstream is not None:
        size = _as_double(upstream).unsqueeze(-1)
    else:
        size = _as_double(truth_grad).abs().max().clamp(min=floor) if truth_grad.numel() else torch.tensor(1.0)
    rows = size * logit_row_scale(logits, temperature).unsqueeze(-1)
    if logits.dtype in (torch.float32, torch.float64):
        return rows
    r = ULPS_GRAD[torch.float32] * ulp(torch.float32) / (ULPS_GRAD[logits.dtype] * ulp(logits.dtype))
    return _as_double(truth_grad).abs() + r * rows


def _as_double(t) -> Tensor:
    if not isinstance(t, Tensor):
        t = torch.as_tensor(t, dtype=torch.float64)
    return t.detach().to(device="cpu", dtype=torch.float64)


def _budget(actual: Tensor, truth: Tensor, eager: Optional[Tensor], scale, floor: float, what: str):
    """``(error, eager error, scale, finite)``, all broadcast to the truth's shape; the eager error
    is its maximum over each block of entries that share one scale (the whole tensor by default)."""
    finite = torch.isfinite(truth)
    zero = torch.zeros_like(truth)
    if scale is None:
        scale = truth[finite].abs().max().clamp(min=floor) if finite.any() else torch.tensor(floor)
    scale = _as_double(scale)
    err = torch.where(finite, (actual - truth).abs(), zero)
    if eager is None:
        eager_err = zero
    else:
        assert not (finite & ~torch.isfinite(eager)).any(), (
            f"{what}: the eager baseline is not finite where the truth is; it cannot bound the error")
        eager_err = torch.where(finite, (eager - truth).abs(), zero)
        shape = (1,) * (truth.dim() - scale.dim()) + tuple(scale.shape)
        dims = [d for d in range(truth.dim()) if shape[d] == 1 and truth.shape[d] != 1]
        if dims:
            eager_err = eager_err.amax(dim=dims, keepdim=True)
    return err, eager_err.expand_as(truth), scale.expand_as(truth), finite


def needed_ulps(actual, truth, eager=None, *, scale=None, floor: float = 1.0,
                ulp_dtype: Optional[torch.dtype] = None) -> float:
    """The smallest ``k`` for which :func:`assert_close_to_truth` would accept the finite entries."""
    a, t = _as_double(actual), _as_double(truth)
    e = None if eager is None else _as_double(eager)
    if t.numel() == 0:
        return 0.0
    err, eager_err, s, finite = _budget(a, t, e, scale, floor, "")
    if not finite.any():
        return 0.0
    eps = ulp(ulp_dtype or (actual.dtype if isinstance(actual, Tensor) else torch.float64))
    excess = (err - eager_err).clamp(min=0) / (eps * s).clamp(min=torch.finfo(torch.float64).tiny)
    return excess[finite].max().item()


def assert_close_to_truth(
    actual: Tensor,
    truth: Union[Tensor, float],
    eager: Optional[Tensor] = None,
    *,
    ulps: Union[float, Mapping[torch.dtype, float]],
    scale: Union[Tensor, float, None] = None,
    floor: float = 1.0,
    ulp_dtype: Optional[torch.dtype] = None,
    dtype: Optional[torch.dtype] = None,
    where: Optional[Tensor] = None,
    what: str = "value",
) -> None:
    """Assert that ``actual`` is within eager PyTorch's own error of ``truth``, plus ``ulps`` ulps.

    Args:
        actual: the backend's result, any float dtype, any device.
        truth: the float64 ground truth, same shape (a Python number for a 0-d result).
        eager: the same quantity from eager PyTorch in the test dtype, same shape; None where
            eager and truth are one computation (float64 runs).
        ulps: ``k``, in units of ``eps`` of ``ulp_dtype`` (default: ``actual.dtype``); a mapping
            from that dtype to ``k`` where the budget differs by dtype (see the module docstring).
        scale: by default ``max(floor, max |truth|)``; a tensor broadcasting against ``truth``
            (see :func:`row_scale`) makes the bound, and the eager error, per block.
        floor: the least scale (default 1: an O(1) number's rounding is the floor of any
            error); 0 for the gradients of a loss (see the module docstring).
        dtype: the dtype ``actual`` must have; by default ``eager.dtype`` when eager is given.
        where: a bool tensor over the leading dims of ``truth``: only those entries (rows) are
            compared, the others being unspecified (per-token outputs at positions the loss mask
            selects out: the public API reads their ids as 0).
        what: names the quantity in the failure message.
    """
    assert isinstance(actual, Tensor), f"{what}: expected a tensor, got {type(actual).__name__}"
    t = _as_double(truth)
    assert actual.shape == t.shape, f"{what}: shape {tuple(actual.shape)}, truth {tuple(t.shape)}"
    if eager is not None:
        assert eager.shape == t.shape, f"{what}: eager shape {tuple(eager.shape)}, truth {tuple(t.shape)}"
    want_dtype = dtype if dtype is not None else (eager.dtype if eager is not None else None)
    if want_dtype is not None:
        assert actual.dtype == want_dtype, f"{what}: dtype {actual.dtype}, expected {want_dtype}"
    assert actual.is_floating_point(), f"{what}: dtype {actual.dtype} is not a float dtype"
    a = _as_double(actual)
    if where is not None:
        keep = where.detach().cpu().bool()
        assert t.shape[:keep.dim()] == keep.shape, f"{what}: where {tuple(keep.shape)}, truth {tuple(t.shape)}"
        a, t = a[keep], t[keep]
        eager = None if eager is None else _as_double(eager)[keep]
        if isinstance(scale, Tensor) and scale.dim() >= keep.dim():
            scale = _as_double(scale)[keep]
    nan_a, nan_t = torch.isnan(a), torch.isnan(t)
    assert torch.equal(nan_a, nan_t), (
        f"{what}: NaN at {int((nan_a & ~nan_t).sum())} entries where the truth is not, "
        f"and not NaN at {int((nan_t & ~nan_a).sum())} where it is")
    inf_t = torch.isinf(t)
    assert torch.equal(a[inf_t], t[inf_t]), f"{what}: the infinite entries of the truth differ"
    assert torch.isfinite(a[~inf_t & ~nan_t]).all(), f"{what}: not finite where the truth is"
    if t.numel() == 0:
        return
    err, eager_err, s, finite = _budget(a, t, None if eager is None else _as_double(eager), scale, floor, what)
    ulp_dtype = ulp_dtype or actual.dtype
    eps = ulp(ulp_dtype)
    if isinstance(ulps, Mapping):
        assert ulp_dtype in ulps, f"{what}: no k for {ulp_dtype} in {dict(ulps)}"
        ulps = ulps[ulp_dtype]
    bound = eager_err + ulps * eps * s
    bad = err > bound
    if bad.any():
        unit = (eps * s).clamp(min=torch.finfo(torch.float64).tiny)
        need = ((err - eager_err) / unit)[finite].max().item()
        at = int(((err - bound) / unit).argmax())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {t.numel()} entries out of bound; worst at flat index {at}: error "
            f"{err.reshape(-1)[at].item():.3g} > eager error {eager_err.reshape(-1)[at].item():.3g} + {ulps} ulp x "
            f"eps {eps:.3g} x scale {s.reshape(-1)[at].item():.3g}; passing would need k >= {need:.3g}")
