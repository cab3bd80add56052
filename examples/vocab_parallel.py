"""Vocab-parallel lm_head and data-parallel normalizers with grpo-fused, on CPU processes.

Run:  python examples/vocab_parallel.py [--world-size 2]

It spawns ``--world-size`` processes on the gloo backend (CPU, loopback only) and shows, next
to the single-process result on the full vocab and the full batch:

1. vocab parallel: each rank holds a slice of the lm_head rows (Megatron's column-parallel
   layout) and calls ``vocab_parallel_linear_grpo_loss``; the loss and ``dhidden`` are the
   same as one process with the whole lm_head, and each rank gets its own ``dweight`` rows.
2. data parallel: each rank holds a different number of sequences, calls
   ``dp_normalizers`` once, and backpropagates ``scale * loss``; averaging the gradients over
   ranks (what DDP / FSDP do) gives the single-process gradient.

On GPUs the same code runs with ``backend="nccl"`` and CUDA tensors (one GPU per rank).
"""

import argparse
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import grpo_fused as gf
from grpo_fused.distributed import dp_normalizers, vocab_parallel_linear_grpo_loss

B, T, H, V = 8, 16, 64, 1001  # V = 1001: the shards need not be equal


def make_batch(seed=0):
    """The same full batch on every rank (in a trainer it comes from the rollout)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = (torch.rand(B, T, generator=g) > 0.2).float()
    advantages = torch.randn(B, generator=g)
    with torch.no_grad():
        old_logps, _ = gf.linear_log_softmax(hidden, weight, ids, backend="reference")
    old_logps = old_logps + 0.1 * torch.randn(B, T, generator=g)
    return hidden, weight, ids, mask, advantages, old_logps


def vocab_parallel_demo(rank, world_size, config):
    hidden, weight, ids, mask, advantages, old_logps = make_batch()
    # Megatron layout: rank r owns the rows [start, start + rows) of the lm_head.
    rows = [V // world_size + (1 if r < V % world_size else 0) for r in range(world_size)]
    start = sum(rows[:rank])
    weight_shard = weight[start:start + rows[rank]].clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    out = vocab_parallel_linear_grpo_loss(h, weight_shard, ids, advantages, mask, old_logps, config=config)
    out.loss.backward()

    # The same loss in one process on the whole lm_head.
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref = gf.linear_grpo_loss(h_ref, w_ref, ids, advantages, mask, old_logps, config=config, backend="reference")
    ref.loss.backward()
    dweight_err = (weight_shard.grad - w_ref.grad[start:start + rows[rank]]).abs().max()
    dweight_err = dweight_err.reshape(1)
    dist.all_reduce(dweight_err, op=dist.ReduceOp.MAX)
    if rank == 0:
        print(f"vocab parallel over {world_size} ranks (lm_head rows {rows}):")
        print(f"  loss {out.loss.item():.7f}   single process {ref.loss.item():.7f}")
        print(f"  max |dhidden - single| {(h.grad - h_ref.grad).abs().max().item():.2e}, "
              f"max |dweight shard - single| {dweight_err.item():.2e}")


def data_parallel_demo(rank, world_size, config):
    hidden, weight, ids, mask, advantages, old_logps = make_batch(seed=1)
    # An uneven split of the B sequences (rank 0 gets the most), as a length-balanced sampler may
    # give; every rank needs at least one sequence.
    share = max(1, B // (world_size + 1))
    sizes = [B - share * (world_size - 1)] + [share] * (world_size - 1)
    lo = sum(sizes[:rank])
    hi = lo + sizes[rank]
    w = weight.clone().requires_grad_()  # the replicated parameter DDP would hold
    norms = dp_normalizers(mask[lo:hi], config)  # one all-reduce of 3 numbers per rank
    out = gf.linear_grpo_loss(hidden[lo:hi], w, ids[lo:hi], advantages[lo:hi], mask[lo:hi], old_logps[lo:hi],
                              config=config, num_items_in_batch=norms.num_items_in_batch,
                              global_batch_size=norms.global_batch_size, backend="reference")
    (norms.scale * out.loss).backward()
    dist.all_reduce(w.grad)  # what DDP's gradient hook does, followed by the division below
    w.grad /= world_size
    loss = (norms.scale * out.loss).detach().reshape(1)
    dist.all_reduce(loss)

    w_ref = weight.clone().requires_grad_()
    ref = gf.linear_grpo_loss(hidden, w_ref, ids, advantages, mask, old_logps, config=config, backend="reference")
    ref.loss.backward()
    if rank == 0:
        print(f"data parallel over {world_size} ranks (sequences per rank {sizes}, "
              f"loss_type={config.loss_type!r}):")
        print(f"  mean of scaled losses {loss.item() / world_size:.7f}   single process {ref.loss.item():.7f}")
        print(f"  max |averaged dweight - single| {(w.grad - w_ref.grad).abs().max().item():.2e}")


def worker(rank, world_size, init_file):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        vocab_parallel_demo(rank, world_size, gf.GRPOConfig(loss_type="dapo", epsilon_high=0.28))
        vocab_parallel_demo(rank, world_size, gf.GRPOConfig(loss_type="grpo", importance_sampling_level="sequence"))
        for loss_type in ("dapo", "bnpo", "grpo"):
            data_parallel_demo(rank, world_size, gf.GRPOConfig(loss_type=loss_type))
    finally:
        dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(args.world_size, os.path.join(tmp, "rendezvous")), nprocs=args.world_size, join=True)


if __name__ == "__main__":
    main()
