"""The one place that gathers a batch across ranks.

Every rank must pass a tensor of the same shape (use drop_last=True for training loaders):
all_gather needs equal shards, and the contrastive terms assume every rank sees the same
global batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _GatherSumGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's shard.

    Every rank computes the same loss on the gathered batch, so the true gradient of that loss
    w.r.t. this rank's shard is what this rank computes itself; the all_reduce makes it
    world_size times that, which DDP's gradient *averaging* then divides back out.
    """

    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        n = grad.shape[0] // dist.get_world_size()
        rank = dist.get_rank()
        return grad[rank * n:(rank + 1) * n]


def gather_with_grad(x: torch.Tensor, grad: str = "sum") -> torch.Tensor:
    """Concatenate ``x`` [n, ...] from all ranks along dim 0 -> [world * n, ...], rank order.

    The local shard keeps its autograd graph; the other shards are constants. ``grad``:
    - "local": the usual trick (all_gather, then put the local tensor back at this rank's
      slot): this rank's shard gets d(loss)/d(shard). After DDP averages over ranks, a loss
      computed on the gathered batch is effectively divided by world_size.
    - "sum": this rank's shard gets the sum over ranks of d(loss_r)/d(shard) (= world_size x
      the above, since every rank computes the same loss), so after DDP averaging the
      parameters see exactly the single-process gradient of the gathered loss.
    Tensors without grad (ids) take a plain all_gather. No-op without torch.distributed.
    """
    if not is_distributed():
        return x
    if grad not in ("sum", "local"):
        raise ValueError(f"grad={grad!r}; expected 'sum' or 'local'")
    if x.requires_grad and grad == "sum":
        return _GatherSumGrad.apply(x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.detach().contiguous())
    if x.requires_grad:
        parts[dist.get_rank()] = x  # put the live tensor back: its graph survives the cat
    return torch.cat(parts, 0)
