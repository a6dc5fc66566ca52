"""Self-training: the unlabelled training items take the class of their labelled neighbours.

Epochs ``from_epoch``, ``from_epoch + every``, ... (0-based) start by embedding the whole training
set with the model as it stands (eval mode, no augmentation) and giving each unlabelled item the
class that at least a share ``agreement`` of its ``k`` nearest labelled items (cosine similarity)
carry; the others stay unlabelled until the next vote. The labelled items keep their labels, and
the pseudo labels are drawn afresh at every vote from the labels the run started with, so a wrong
one is not kept once the model knows better. A loss that takes partial labels
(``contrastive-hash``, ``csq``, an aux classifier) then uses them like labels. A
``labelled-share`` sampler keeps the lists it was built with: the pseudo-labelled images stay in
the unlabelled part of each batch.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from deephash.data.loader import BatchLoader
from deephash.data.unlabelled import NO_LABEL
from deephash.errors import DeephashError
from deephash.train.callbacks import Callback

__all__ = ["PseudoLabels", "knn_pseudo_labels"]

#: Similarities computed at once (unlabelled rows × labelled rows): 2^25 float32 values, 128 MiB.
_CHUNK_VALUES = 2 ** 25
#: A label that no vote gives: rank 0's signal that its pass failed (under DDP).
_FAILED = -2


@torch.no_grad()
def knn_pseudo_labels(embeddings: torch.Tensor, labels: torch.Tensor, k: int, agreement: float) -> torch.Tensor:
    """Labels for the unlabelled rows from a vote of their nearest labelled rows.

    Args:
        embeddings: float ``(N, D)``; compared by cosine similarity.
        labels: int64 ``(N,)``: a class ``>= 0``, or ``NO_LABEL`` (-1) for an unlabelled row.
        k: neighbours that vote (at most the number of labelled rows).
        agreement: the share of the ``k`` votes in ``(0, 1]`` that the winning class needs
            (votes / k >= agreement, so 0.7 with k = 10 takes 7 votes).

    Returns:
        int64 ``(N,)`` on ``labels``' device: the labelled rows' labels unchanged; each unlabelled
        row the class with the most votes (the lowest such class on a tie) where it has enough of
        them, else ``NO_LABEL``. Which of several equally similar labelled rows vote follows
        ``torch.topk``. The work runs on ``embeddings``' device.
    """
    if embeddings.ndim != 2 or labels.shape != embeddings.shape[:1]:
        raise DeephashError(f"knn_pseudo_labels needs embeddings (N, D) and labels (N,), got "
                            f"{tuple(embeddings.shape)} and {tuple(labels.shape)}")
    out = labels.to(embeddings.device, copy=True)
    has_label = out >= 0
    if not bool(has_label.any()) or bool(has_label.all()):
        return out.to(labels.device)
    reference = F.normalize(embeddings[has_label].float(), dim=1)
    reference_labels = out[has_label]
    n_classes = int(reference_labels.max()) + 1
    k = min(int(k), len(reference))
    rows = (~has_label).nonzero().squeeze(1)
    chunk_rows = max(1, _CHUNK_VALUES // len(reference))
    for start in range(0, len(rows), chunk_rows):
        chunk = rows[start:start + chunk_rows]
        similarity = F.normalize(embeddings[chunk].float(), dim=1) @ reference.T
        voters = reference_labels[similarity.topk(k, dim=1).indices]  # (C, k)
        votes = torch.zeros(len(chunk), n_classes, dtype=torch.int32, device=out.device)
        votes.scatter_add_(1, voters, torch.ones_like(voters, dtype=torch.int32))  # (C, n_classes)
        count, winner = votes.max(dim=1)  # max returns the first (lowest) class among ties
        enough = count.double() / k >= agreement
        out[chunk] = torch.where(enough, winner, torch.full_like(winner, NO_LABEL))
    return out.to(labels.device)


class PseudoLabels(Callback):
    """A ``fit`` callback that relabels ``dataset``'s unlabelled items (:func:`knn_pseudo_labels`)
    at the start of epochs ``from_epoch``, ``from_epoch + every``, ...; the epochs between train
    with the last vote's labels. Each epoch from ``from_epoch`` on records how many items carry a
    pseudo label.

    Args:
        dataset: has ``data`` uint8 ``(N, C, H, W)`` and ``targets`` int64 ``(N,)`` (-1:
            unlabelled), read by the training loader; its ``targets`` are replaced each epoch.
        model: the model being trained; put in eval mode for the pass and back after.
        embed: float ``[0, 1]`` images ``(B, C, H, W)`` -> float ``(B, D)`` (e.g. the hash head's
            tanh codes), run under ``no_grad``.
        from_epoch: the first (0-based) epoch that trains with pseudo labels.
        every: epochs from one vote to the next (1: every epoch).
        k, agreement: the vote (see :func:`knn_pseudo_labels`).
        device: where the pass runs.
        batch_size: images per forward pass.
        broadcast: makes every process hold rank 0's labels (under DDP); None in one process.
        is_main: whether this process computes the labels (the others receive them; if rank 0's
            pass fails, every rank raises instead of waiting).

    A vote depends only on the weights at its epoch's start, and :meth:`state_dict` holds the
    last vote's labels (for the checkpoints), so a resumed run trains on exactly the labels of an
    uninterrupted one, also when it resumes between two votes.
    """

    def __init__(self, dataset: Any, model: torch.nn.Module, embed: Callable[[torch.Tensor], torch.Tensor],
                 from_epoch: int, k: int, agreement: float, device: torch.device | str, batch_size: int = 1024,
                 broadcast: Callable[[torch.Tensor], torch.Tensor] | None = None, is_main: bool = True,
                 every: int = 1) -> None:
        if every < 1:
            raise DeephashError(f"PseudoLabels needs every >= 1, got {every}")
        self.dataset, self.model, self.embed = dataset, model, embed
        self.start_labels = dataset.targets.clone()
        self.from_epoch, self.every, self.k, self.agreement = from_epoch, every, k, agreement
        self.device, self.batch_size = torch.device(device), batch_size
        self.broadcast, self.is_main = broadcast, is_main
        self.labels: torch.Tensor | None = None  # the last vote's labels (None before the first)
        self.n_labelled: int | None = None

    def state_dict(self) -> dict[str, Any]:
        """The last vote's labels, int64 ``(N,)`` on the CPU (None before the first vote)."""
        return {"labels": None if self.labels is None else self.labels.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s labels (a resumed run between two votes trains on them)."""
        labels = state.get("labels")
        if labels is None:
            self.labels = None
            return
        kept = self.start_labels >= 0
        if (not torch.is_tensor(labels) or labels.dtype != torch.int64 or labels.shape != self.start_labels.shape
                or bool((labels < NO_LABEL).any()) or not torch.equal(labels[kept].cpu(), self.start_labels[kept])):
            raise DeephashError(f"pseudo labels to restore must be int64 {tuple(self.start_labels.shape)}, >= -1, with the "
                                "run's own labels where it has them (a checkpoint of another labelled draw?)")
        self.labels = labels.to("cpu", copy=True)

    @torch.no_grad()
    def _embeddings(self) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [self.embed(x) for x, _ in BatchLoader.sequential(self.dataset, self.batch_size, self.device)]
        finally:
            self.model.train(was_training)
        return torch.cat(parts)

    def on_epoch_start(self, epoch: int) -> None:
        if epoch < self.from_epoch:
            self.n_labelled = None
            return
        if (epoch - self.from_epoch) % self.every == 0:
            self._use(self._vote(epoch))
        elif self.labels is None:
            raise DeephashError(f"epoch {epoch + 1} trains on the pseudo labels of an earlier vote, but none "
                                "were restored (a checkpoint without them?)")
        else:
            self._use(self.labels)

    def _use(self, labels: torch.Tensor) -> None:
        self.labels = labels
        self.dataset.targets = labels
        self.n_labelled = int((labels >= 0).sum() - (self.start_labels >= 0).sum())

    def _vote(self, epoch: int) -> torch.Tensor:
        labels = self.start_labels.to(self.device, copy=True)  # a broadcast writes into it
        failure: BaseException | None = None
        if self.is_main:
            try:
                labels = knn_pseudo_labels(self._embeddings(), labels, self.k, self.agreement)
            except Exception as error:  # tell the other ranks, which wait in the broadcast
                if self.broadcast is None:
                    raise
                failure, labels = error, torch.full_like(labels, _FAILED)
        if self.broadcast is not None:
            labels = self.broadcast(labels)
        if failure is not None:
            raise failure
        if bool((labels == _FAILED).any()):
            raise DeephashError(f"pseudo labels of epoch {epoch + 1}: rank 0's pass failed (its error says why)")
        return labels.cpu()

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        if self.n_labelled is not None:
            record["pseudo_labelled"] = self.n_labelled

    def on_train_end(self, history: list[dict]) -> None:
        self.dataset.targets = self.start_labels  # what the rest of the run (code rule, re-rank head) sees
