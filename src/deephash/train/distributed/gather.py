"""Global-batch mining under DDP: gather every rank's outputs with gradients, apply the loss once.

Gradient scale of :class:`GatherLoss`. Let ``z_r`` be rank ``r``'s embeddings, ``W`` the world
size and ``L(z_0, ..., z_{W-1})`` the wrapped loss on the concatenated global batch. Every rank
computes the same ``L``. The gather (:func:`gather_with_grad`, the autograd all_gather of
``torch.distributed.nn.functional``) back-propagates by summing, over all ranks, the gradients
that reach each rank's slice, so owner ``r`` receives
``W * dL/dz_r`` and its local parameter gradient is ``W * dL/dz_r * dz_r/dθ``. DDP then averages
over ranks (sum / W): ``Σ_r dL/dz_r * dz_r/dθ``, the single-process gradient of ``L`` on the
concatenated batch. The factor is therefore exactly 1: the loss must *not* be multiplied by
``W`` (that factor belongs to gathers that keep only the local slice's gradient, as
pytorch-metric-learning's wrapper does, and applied to an autograd gather it doubles the
gradients on two ranks).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from deephash.train.distributed.process_group import rank, world_size

__all__ = ["GatherLoss", "gather_no_grad", "gather_with_grad", "unwrap_loss"]




class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for each slice and returns the own one."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.rows = x.shape[0]
        return gather_no_grad(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)  # sum over ranks (a reduce-scatter, done with the portable all_reduce)
        start = rank() * ctx.rows
        return grad[start : start + ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, ``(W*B, ...)``; gradients flow to the owners.

    The backward pass sums the gradients that every rank's graph sends to each slice and hands
    each owner its slice's sum (as ``torch.distributed.nn.functional.all_gather`` does). Every
    rank must pass a tensor of the same shape.
    """
    return _GatherWithGrad.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Every rank's ``x`` concatenated in rank order, without gradients (e.g. labels)."""
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


class GatherLoss(nn.Module):
    """Apply a loss to the global batch: every rank's outputs and labels, gathered.

    Called as ``loss(*outputs, labels)`` like the wrapped loss (``outputs`` float ``(B, D)``
    tensors, e.g. embeddings or relaxed codes, and logits; ``labels`` int64 ``(B,)``). With
    ``mine_globally`` and in training mode, each output is gathered with :func:`gather_with_grad`
    (an autograd all_gather: gradients flow back to the rank that made them) and the labels with ``all_gather``, in rank order, so selectors and losses see
    ``(W*B, D)``; the returned loss equals the single-process loss on the concatenated batch and,
    after DDP averages the gradients, so do the parameter gradients (no extra scale, see the
    module docstring). Every rank must hold the same batch size.

    With ``mine_globally=False`` (or in eval mode, or outside a distributed job) the wrapped loss
    runs on the local batch: the returned value is this rank's loss, and after DDP the gradients
    are those of the mean of the ranks' losses.

    Args:
        loss_fn: the loss, e.g. ``OnlineTripletLoss`` or a hashing loss.
        mine_globally: gather before mining (True) or mine on the local batch (False).
        n_views: views per image in each rank's batch, stacked view-major (``data.views``); the
            gathered batch is put back in view-major order (every rank's first views, then every
            rank's second views, ...) so instance terms pair each image's views as on one process.

    Attributes:
        num_selected: the wrapped loss's ``num_selected`` after the last call (global count when
            gathered), or None.
    """

    def __init__(self, loss_fn: Callable[..., torch.Tensor], mine_globally: bool = True, n_views: int = 1) -> None:
        super().__init__()
        self.loss = loss_fn
        self.mine_globally = mine_globally
        self.n_views = n_views

    @property
    def num_selected(self) -> Any:
        return getattr(self.loss, "num_selected", None)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        *outputs, labels = inputs
        if self.mine_globally and self.training and world_size() > 1:
            outputs = [self._view_major(gather_with_grad(o)) for o in outputs]
            labels = self._view_major(gather_no_grad(labels))
        return self.loss(*outputs, labels)

    def _view_major(self, x: torch.Tensor) -> torch.Tensor:
        """Rank-major ``(W*V*b, ...)`` rows (each rank's views stacked) -> view-major across ranks."""
        if self.n_views == 1:
            return x
        w, v = world_size(), self.n_views
        return x.reshape(w, v, -1, *x.shape[1:]).transpose(0, 1).reshape(x.shape)


def unwrap_loss(loss_fn: Any) -> Any:
    """The loss inside any :class:`GatherLoss` wrappers."""
    while isinstance(loss_fn, GatherLoss):
        loss_fn = loss_fn.loss
    return loss_fn
