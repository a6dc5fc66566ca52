"""Cross-batch memory (XBM; Wang, Zhang, Huang & Scott, CVPR 2020) for the online losses.

A ring buffer of the last ``memory_size`` embeddings (detached) and their labels. Each training
step mines pairs or triplets whose anchors are the current batch and whose positives and
negatives come from the batch and the memory (the rectangular case of `deephash.mining`), then
enqueues the batch. Only the batch's embeddings receive gradients.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from deephash.errors import ConfigError
from deephash.losses.hashing import DTSHLoss
from deephash.losses.metric import upcast_half
from deephash.losses.online import OnlineContrastiveLoss, OnlineTripletLoss
from deephash.mining.selectors import AllTripletSelector


class CrossBatchMemory(nn.Module):
    """Wraps an online loss so that it mines from the batch and a queue of past batches.

    Step ``s`` (counted over training-mode calls, from 0):

    * ``s < warmup_steps``: the wrapped loss on the batch alone; nothing is enqueued (XBM's advice:
      early embeddings drift too fast to be worth keeping).
    * otherwise: if the memory holds anything, the wrapped loss over the batch's anchors and
      batch ∪ memory (memory slots in storage order after the batch's columns), else the batch
      alone; then the batch is enqueued, detached, overwriting the oldest slots (a batch larger
      than the memory keeps its last ``memory_size`` rows).

    In eval mode the wrapped loss sees the batch alone and the memory is left as it is.
    Under DDP, wrap this module in the gather (``GatherLoss(CrossBatchMemory(...))``) so that every
    rank enqueues the same global batch and holds the same memory.

    With the memory, an in-batch anchor-positive (or contrastive) pair appears once per anchor,
    i.e. in both orders, unlike the batch alone's ``a < p`` (see `deephash.mining.triplets`).

    The wrapped loss's attributes (``margin``, ``quantization_weight``, ...) are read and written
    through the wrapper, so weight schedules apply to it unchanged.

    Args:
        loss: an ``OnlineTripletLoss`` (any selector), ``OnlineContrastiveLoss`` (``all-positive``
            or ``hard-negative``) or ``DTSHLoss`` (any selector but ``all``, whose O(B·(B+M)²)
            triplets DTSH would list).
        memory_size: M, slots in the queue.
        embedding_dim: D, width of the embeddings (bits for DTSH's relaxed codes).
        warmup_steps: training steps before the memory is filled and used.

    Attributes:
        memory: float ``(M, D)`` buffer on the embeddings' device (its dtype follows the
            embeddings', float32 for half precision); ``memory_labels`` int64 ``(M,)``.
        pointer: next slot to write; ``filled``: slots holding embeddings; ``step``: training calls
            so far (plain ints, saved in the state dict as extra state).
        num_selected: the wrapped loss's count of pairs/triplets in the last call.
    """

    memory: torch.Tensor
    memory_labels: torch.Tensor

    def __init__(self, loss: nn.Module, memory_size: int, embedding_dim: int, warmup_steps: int = 0) -> None:
        super().__init__()
        _check_wrappable(loss)
        if memory_size < 1 or embedding_dim < 1 or warmup_steps < 0:
            raise ConfigError(
                f"CrossBatchMemory needs memory_size >= 1, embedding_dim >= 1 and warmup_steps >= 0, got "
                f"{memory_size}, {embedding_dim}, {warmup_steps}"
            )
        self.memory_size = int(memory_size)
        self.embedding_dim = int(embedding_dim)
        self.warmup_steps = int(warmup_steps)
        self.register_buffer("memory", torch.zeros(self.memory_size, self.embedding_dim))
        self.register_buffer("memory_labels", torch.zeros(self.memory_size, dtype=torch.int64))
        self.pointer = 0
        self.filled = 0
        self.step = 0
        self.loss = loss  # last: from here on, unknown attributes are the loss's

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("loss")
            if inner is None:
                raise
            return getattr(inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        inner = self.__dict__.get("_modules", {}).get("loss")
        if inner is not None and name not in self.__dict__ and not hasattr(type(self), name) and hasattr(inner, name):
            setattr(inner, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def num_selected(self) -> int | torch.Tensor:
        return self.loss.num_selected

    def memory_bytes(self) -> int:
        """Bytes held by the two buffers (embeddings and labels)."""
        return self.memory.numel() * self.memory.element_size() + self.memory_labels.numel() * 8

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """``embeddings`` float ``(B, D)``, ``labels`` int64 ``(B,)`` → the wrapped loss (scalar)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ConfigError(
                f"CrossBatchMemory holds {self.embedding_dim}-wide embeddings, got shape {tuple(embeddings.shape)}"
            )
        if labels.shape != embeddings.shape[:1]:
            raise ConfigError(f"labels must be ({len(embeddings)},), got shape {tuple(labels.shape)}")
        if not self.training:
            return self.loss(embeddings, labels)
        labels = labels.to(embeddings.device)
        self._follow(embeddings)
        active = self.step >= self.warmup_steps
        if active and self.filled > 0:
            # a copy: the loss's graph keeps the memory (for the batch's gradient), and the
            # enqueue below writes into the buffer before backward runs
            memory = self.memory[: self.filled].clone()
            loss = self.loss(embeddings, labels, memory, self.memory_labels[: self.filled].clone())
        else:
            loss = self.loss(embeddings, labels)
        if active:
            self._enqueue(embeddings.detach(), labels)
        self.step += 1
        return loss

    def reset(self) -> None:
        """Empty the memory and restart the step count (the warm-up runs again)."""
        self.memory.zero_()
        self.memory_labels.zero_()
        self.pointer = self.filled = self.step = 0

    def _follow(self, embeddings: torch.Tensor) -> None:
        """Move the buffers to the embeddings' device and (upcast) dtype, once."""
        dtype = upcast_half(embeddings[:0]).dtype
        if self.memory.device != embeddings.device or self.memory.dtype != dtype:
            self.memory = self.memory.to(embeddings.device, dtype)
        if self.memory_labels.device != embeddings.device:
            self.memory_labels = self.memory_labels.to(embeddings.device)

    @torch.no_grad()
    def _enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Write the batch (its last ``memory_size`` rows) at ``pointer``, wrapping around."""
        n = min(len(embeddings), self.memory_size)
        rows, row_labels = embeddings[len(embeddings) - n :], labels[len(labels) - n :]
        head = min(n, self.memory_size - self.pointer)
        self.memory[self.pointer : self.pointer + head] = rows[:head]
        self.memory_labels[self.pointer : self.pointer + head] = row_labels[:head]
        self.memory[: n - head] = rows[head:]
        self.memory_labels[: n - head] = row_labels[head:]
        self.pointer = (self.pointer + n) % self.memory_size
        self.filled = min(self.memory_size, self.filled + n)

    def get_extra_state(self) -> dict[str, int]:
        return {"pointer": self.pointer, "filled": self.filled, "step": self.step}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        pointer, filled, step = (int(state[key]) for key in ("pointer", "filled", "step"))
        if not (0 <= pointer < self.memory_size and 0 <= filled <= self.memory_size and step >= 0):
            raise ConfigError(
                f"CrossBatchMemory state (pointer {pointer}, filled {filled}, step {step}) does not fit a "
                f"memory of {self.memory_size}"
            )
        self.pointer, self.filled, self.step = pointer, filled, step

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[override]
        # The saved memory may be float64 or on another device: adopt its dtype, keep our device.
        key = prefix + "memory"
        if key in state_dict and state_dict[key].shape == self.memory.shape:
            self.memory = self.memory.to(dtype=state_dict[key].dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"memory_size={self.memory_size}, embedding_dim={self.embedding_dim}, warmup_steps={self.warmup_steps}"


def _check_wrappable(loss: object) -> None:
    """Raise ``ConfigError`` unless ``loss`` and its selector can mine from a memory."""
    if not isinstance(loss, (OnlineTripletLoss, OnlineContrastiveLoss, DTSHLoss)):
        raise ConfigError(
            f"CrossBatchMemory wraps OnlineTripletLoss, OnlineContrastiveLoss or DTSHLoss, got {type(loss).__name__}"
        )
    selector = getattr(loss, "triplet_selector", None) or getattr(loss, "pair_selector", None)
    method = getattr(selector, "get_triplets", None) or getattr(selector, "get_pairs", None)
    if method is None or "memory" not in inspect.signature(method).parameters:
        raise ConfigError(
            f"selector {type(selector).__name__} cannot mine from a memory (its get_triplets/get_pairs "
            "takes no memory, memory_labels); use one of deephash.mining's selectors"
        )
    if isinstance(loss, DTSHLoss) and isinstance(selector, AllTripletSelector):
        raise ConfigError(
            "CrossBatchMemory with DTSH and the 'all' selector would list O(B·(B+M)²) triplets; "
            "use hardest, random, semihard or batch-hard"
        )
