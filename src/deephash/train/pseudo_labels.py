"""Self-training: the unlabelled training items take the class of their labelled neighbours.

From a chosen epoch on, every epoch starts by embedding the whole training set with the model as
it stands (eval mode, no augmentation) and giving each unlabelled item the class that at least a
share ``agreement`` of its ``k`` nearest labelled items (cosine similarity) carry; the others stay
unlabelled for that epoch. The labelled items keep their labels, and the pseudo labels are drawn
afresh every epoch from the labels the run started with, so a wrong one is not kept once the model
knows better. A loss that takes partial labels (``contrastive-hash``) then uses them like labels.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F

from deephash.data.unlabelled import NO_LABEL
from deephash.train.callbacks import Callback

__all__ = ["PseudoLabels", "knn_pseudo_labels"]

#: Unlabelled rows whose similarities to the labelled rows are computed at once.
_CHUNK = 4096


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
        ``torch.topk``.
    """
    has_label = labels >= 0
    out = labels.clone()
    if not bool(has_label.any()) or bool(has_label.all()):
        return out
    reference = F.normalize(embeddings[has_label].float(), dim=1)
    reference_labels = labels[has_label]
    n_classes = int(reference_labels.max()) + 1
    k = min(int(k), len(reference))
    rows = (~has_label).nonzero().squeeze(1)
    for start in range(0, len(rows), _CHUNK):
        chunk = rows[start:start + _CHUNK]
        similarity = F.normalize(embeddings[chunk].float(), dim=1) @ reference.T
        voters = reference_labels[similarity.topk(k, dim=1).indices]  # (C, k)
        votes = F.one_hot(voters, n_classes).sum(dim=1)  # (C, n_classes)
        count, winner = votes.max(dim=1)  # max returns the first (lowest) class among ties
        enough = count.double() / k >= agreement
        out[chunk] = torch.where(enough, winner, torch.full_like(winner, NO_LABEL))
    return out


class PseudoLabels(Callback):
    """A ``fit`` callback that relabels ``dataset``'s unlabelled items at the start of every epoch
    from ``from_epoch`` on (:func:`knn_pseudo_labels`), and records how many got a label.

    Args:
        dataset: has ``data`` uint8 ``(N, C, H, W)`` and ``targets`` int64 ``(N,)`` (-1:
            unlabelled), read by the training loader; its ``targets`` are replaced each epoch.
        model: the model being trained; put in eval mode for the pass and back after.
        embed: float ``[0, 1]`` images ``(B, C, H, W)`` -> float ``(B, D)`` (e.g. the hash head's
            tanh codes), run under ``no_grad``.
        from_epoch: the first (0-based) epoch that trains with pseudo labels.
        k, agreement: the vote (see :func:`knn_pseudo_labels`).
        device: where the pass runs.
        batch_size: images per forward pass.
        broadcast: makes every process hold rank 0's labels (under DDP); None in one process.
        is_main: whether this process computes the labels (the others receive them).

    The labels depend only on the weights at the epoch's start, so a resumed run relabels exactly
    as an uninterrupted one; nothing is stored in the checkpoints.
    """

    def __init__(self, dataset: Any, model: torch.nn.Module, embed: Callable[[torch.Tensor], torch.Tensor],
                 from_epoch: int, k: int, agreement: float, device: torch.device | str, batch_size: int = 1024,
                 broadcast: Callable[[torch.Tensor], torch.Tensor] | None = None, is_main: bool = True) -> None:
        self.dataset, self.model, self.embed = dataset, model, embed
        self.start_labels = dataset.targets.clone()
        self.from_epoch, self.k, self.agreement = from_epoch, k, agreement
        self.device, self.batch_size = torch.device(device), batch_size
        self.broadcast, self.is_main = broadcast, is_main
        self.n_labelled: int | None = None

    @torch.no_grad()
    def _embeddings(self) -> torch.Tensor:
        data = self.dataset.data
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [self.embed(data[i:i + self.batch_size].to(self.device).float().div_(255))
                     for i in range(0, len(data), self.batch_size)]
        finally:
            self.model.train(was_training)
        return torch.cat(parts)

    def on_epoch_start(self, epoch: int) -> None:
        if epoch < self.from_epoch:
            self.n_labelled = None
            return
        labels = self.start_labels.to(self.device)
        if self.is_main:
            labels = knn_pseudo_labels(self._embeddings(), labels, self.k, self.agreement)
        if self.broadcast is not None:
            labels = self.broadcast(labels)
        self.dataset.targets = labels.cpu()
        self.n_labelled = int((self.dataset.targets >= 0).sum() - (self.start_labels >= 0).sum())

    def on_epoch_end(self, epoch: int, record: dict) -> None:
        if self.n_labelled is not None:
            record["pseudo_labelled"] = self.n_labelled

    def on_train_end(self, history: list[dict]) -> None:
        self.dataset.targets = self.start_labels  # what the rest of the run (code rule, re-rank head) sees
