"""The eager PyTorch backend: the spec itself (:mod:`grpo_fused.reference`), materialized logits.

The loss entry points read the temperature from ``params`` as a 0-dim tensor, so that a traced
step stays valid for a new temperature, exactly like the fused backends.
"""

from __future__ import annotations

from .. import reference as _ref
from ..semantics import Option, compute_dtype, grpo_output

__all__ = ["availability", "grpo_loss", "linear_grpo_loss", "selective_log_softmax", "linear_log_softmax",
           "group_advantages"]

def availability(device):
    return None


def selective_log_softmax(logits, ids, temperature, compute_entropy, sampling=None):
    return _ref.selective_log_softmax(logits, ids, temperature, compute_entropy, **_rule_kwargs(sampling))


def linear_log_softmax(hidden, weight, bias, ids, temperature, compute_entropy, strategy="auto", chunk_size=None,
                       filter_eps=None, sampling=None):
    _no_fused_options(chunk_size, filter_eps)
    return _ref.linear_log_softmax(hidden, weight, ids, temperature, bias, compute_entropy, **_rule_kwargs(sampling))


def grpo_loss(logits, batch, params, inplace_backward=False):
    if inplace_backward:
        raise ValueError("inplace_backward=True needs a fused backend (triton or cpp); the reference "
                         "materializes its own fp32 logits")
    return _loss(logits, batch, params)


def linear_grpo_loss(hidden, weight, bias, batch, params, strategy="auto", chunk_size=None, filter_eps=None):
    # The reference always materializes the logits; ``strategy`` picks among fused kernels only.
    _no_fused_options(chunk_size, filter_eps)
    return _loss(_ref.linear_logits(hidden, weight, bias), batch, params)


def _loss(logits, batch, params):
    h = params.hyper(compute_dtype(logits.dtype), logits.device)
    z = logits.to(compute_dtype(logits.dtype)) / h.temperature
    support = None
    if params.spec.has(Option.SAMPLING_SUPPORT):
        # The rule's numbers as 0-dim tensors (values slots): a new top_p is new data here too.
        support = _ref.sampling_support_of(z, h.top_k, h.top_p, h.log_min_p,
                                           params.spec.has(Option.TOP_K_ALL_TIES))
    logps, entropy = _ref.log_softmax_on(z, batch.completion_ids, params.spec.compute_entropy, batch.completion_mask,
                                         support)
    return grpo_output(logps, entropy, batch, params)


def _rule_kwargs(sampling):
    if sampling is None:
        return {}
    return dict(top_k=sampling.top_k, top_p=sampling.top_p, min_p=sampling.min_p, top_k_ties=sampling.top_k_ties)


def group_advantages(rewards, request):
    return _ref.group_advantages(rewards, **request.as_kwargs())


def _no_fused_options(chunk_size, filter_eps):
    for name, value in (("chunk_size", chunk_size), ("filter_eps", filter_eps)):
        if value is not None:
            raise ValueError(f"{name} tunes a fused backend; the reference materializes the logits whole")
