"""Self-training's vote (``knn_pseudo_labels``) against a brute-force loop, its boundaries on tied
values, and the callback that relabels a training set each epoch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import deephash.train.pseudo_labels as pseudo_module
from deephash.data.datasets import ArrayDataset
from deephash.errors import DeephashError
from deephash.train.pseudo_labels import PseudoLabels, knn_pseudo_labels


def _loop_vote(embeddings: np.ndarray, labels: np.ndarray, k: int, agreement: float) -> np.ndarray:
    """The oracle: for each unlabelled row, sort the labelled rows by cosine similarity, count the
    classes of the first k in a dict, take the most frequent (lowest class on a tie)."""
    unit = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    labelled = [i for i in range(len(labels)) if labels[i] >= 0]
    k = min(k, len(labelled))
    out = labels.copy()
    for i in range(len(labels)):
        if labels[i] >= 0:
            continue
        order = sorted(labelled, key=lambda j: -float(unit[i] @ unit[j]))[:k]
        counts: dict[int, int] = {}
        for j in order:
            counts[int(labels[j])] = counts.get(int(labels[j]), 0) + 1
        best = min(counts, key=lambda c: (-counts[c], c))
        out[i] = best if counts[best] / k >= agreement else -1
    return out


@pytest.mark.parametrize("k, agreement", [(1, 1.0), (5, 0.6), (7, 0.5), (10, 0.9), (40, 0.3)])
def test_the_vote_equals_a_brute_force_loop(k, agreement):  # k = 1 labels every row
    rng = np.random.default_rng(k)
    centers = rng.normal(size=(4, 6))
    classes = rng.integers(0, 4, size=90)
    embeddings = (centers[classes] + 0.7 * rng.normal(size=(90, 6))).astype(np.float32)
    labels = np.where(rng.random(90) < 0.4, classes, -1)
    got = knn_pseudo_labels(torch.from_numpy(embeddings), torch.from_numpy(labels), k, agreement).numpy()
    expected = _loop_vote(embeddings, labels, k, agreement)
    np.testing.assert_array_equal(got, expected)
    assert (got >= 0).sum() > (labels >= 0).sum()  # some rows did get a label
    if (k, agreement) in ((5, 0.6), (10, 0.9)):  # a demanding vote left some out
        assert ((got == -1) & (labels == -1)).any()


def _tied_case(votes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One unlabelled row; len(votes) labelled rows equal to it (cosine 1, ±1 entries) with the
    classes ``votes``, and 6 labelled rows of class 9 opposite to it (cosine -1): the k = len(votes)
    nearest are exactly the tied rows."""
    code = torch.tensor([1.0, -1.0, 1.0, 1.0])
    rows = [code] + [code] * len(votes) + [-code] * 6
    labels = [-1] + votes + [9] * 6
    return torch.stack(rows), torch.tensor(labels)


@pytest.mark.parametrize("votes, agreement, expected", [
    ([3] * 7 + [1, 2, 4], 0.7, 3),       # 7 of 10 at 0.7: enough (7/10 is not below 0.7)
    ([3] * 7 + [1, 2, 4], 0.71, -1),     # just above: not enough
    ([3] * 6 + [1, 1, 2, 4], 0.7, -1),   # 6 of 10
    ([5] * 3 + [2] * 3 + [7], 3 / 7, 2),  # a tie of 3 and 3 at exactly 3/7: the lower class
    ([5] * 10, 1.0, 5),                  # unanimous at 1.0
    ([5] * 9 + [0], 1.0, -1),
])
def test_the_agreement_boundary_on_tied_codes(votes, agreement, expected):
    embeddings, labels = _tied_case(votes)
    out = knn_pseudo_labels(embeddings, labels, len(votes), agreement)
    assert int(out[0]) == expected
    assert torch.equal(out[1:], labels[1:])


def test_labelled_rows_keep_their_labels_and_k_is_capped_by_the_labelled_count():
    embeddings, labels = _tied_case([4, 4])
    out = knn_pseudo_labels(embeddings, labels, 50, 0.25)  # k -> 8 labelled rows: 2 of class 4, 6 of 9
    assert int(out[0]) == 9 and torch.equal(out[1:], labels[1:])
    for all_or_none in (torch.full((5,), -1), torch.arange(5)):
        same = knn_pseudo_labels(torch.randn(5, 3), all_or_none, 3, 0.5)
        assert torch.equal(same, all_or_none) and same is not all_or_none


def test_chunks_give_the_same_labels(monkeypatch):
    torch.manual_seed(0)
    embeddings, labels = torch.randn(50, 5), torch.randint(-1, 3, (50,))
    whole = knn_pseudo_labels(embeddings, labels, 4, 0.5)
    monkeypatch.setattr(pseudo_module, "_CHUNK_VALUES", 60)  # about 37 labelled rows: one unlabelled row at a time
    assert torch.equal(knn_pseudo_labels(embeddings, labels, 4, 0.5), whole)


class _Probe(torch.nn.Module):
    """A stand-in model: the embedding of an image is its first two pixels, centred."""

    def __init__(self) -> None:
        super().__init__()
        self.modes: list[bool] = []

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        self.modes.append(self.training)
        return x.flatten(1)[:, :2] - 0.5


def _pixels(degrees: float) -> list[int]:
    return [round(128 + 120 * np.cos(np.radians(degrees))), round(128 + 120 * np.sin(np.radians(degrees)))]


def _dataset() -> ArrayDataset:
    """Images whose first two pixels place them at an angle: labelled 0 at 0° and 20°, labelled 1
    at 90° and 110°; unlabelled at 10° (both nearest of class 0), 100° (class 1) and 52° (nearest
    20°, then 90°: one vote each with k = 2)."""
    angles = [0, 20, 90, 110, 10, 100, 52]
    data = torch.zeros(len(angles), 1, 2, 2, dtype=torch.uint8)
    data[:, 0, 0] = torch.tensor([_pixels(a) for a in angles], dtype=torch.uint8)
    return ArrayDataset(data, [0, 0, 1, 1, -1, -1, -1])


def test_the_callback_relabels_from_its_epoch_on_from_the_starting_labels_each_time():
    dataset, probe = _dataset(), _Probe()
    start = dataset.targets.clone()
    callback = PseudoLabels(dataset, probe, probe.embed, from_epoch=2, k=2, agreement=1.0, device="cpu", batch_size=3)
    probe.train()
    record: dict = {}
    callback.on_epoch_start(1)
    callback.on_epoch_end(1, record)
    assert torch.equal(dataset.targets, start) and "pseudo_labelled" not in record and probe.modes == []
    callback.on_epoch_start(2)
    assert dataset.targets.tolist() == [0, 0, 1, 1, 0, 1, -1]
    assert probe.modes == [False] * 3 and probe.training  # eval mode for the pass (3 batches), back after
    callback.on_epoch_end(2, record)
    assert record["pseudo_labelled"] == 2
    # the next epoch votes again from the starting labels: the image at 10° moves to 52°, and its
    # label of epoch 2 goes (kept, it would vote for itself as a labelled image and stay 0)
    dataset.data[4, 0, 0] = torch.tensor(_pixels(52), dtype=torch.uint8)
    callback.on_epoch_start(3)
    assert dataset.targets.tolist() == [0, 0, 1, 1, -1, 1, -1]
    callback.on_epoch_end(3, record)
    assert record["pseudo_labelled"] == 1
    callback.on_train_end([])
    assert torch.equal(dataset.targets, start)


def test_every_votes_on_its_epochs_only_and_the_epochs_between_train_on_the_last_vote():
    dataset, probe = _dataset(), _Probe()
    callback = PseudoLabels(dataset, probe, probe.embed, from_epoch=2, k=2, agreement=1.0, device="cpu", batch_size=3,
                            every=3)
    voted = [0, 0, 1, 1, 0, 1, -1]
    callback.on_epoch_start(2)
    assert dataset.targets.tolist() == voted and len(probe.modes) == 3
    dataset.data[4, 0, 0] = torch.tensor(_pixels(52), dtype=torch.uint8)  # a vote now would drop its label
    record: dict = {}
    for epoch in (3, 4):  # between votes: no pass, the last vote's labels
        callback.on_epoch_start(epoch)
        callback.on_epoch_end(epoch, record)
        assert dataset.targets.tolist() == voted and len(probe.modes) == 3 and record["pseudo_labelled"] == 2
    callback.on_epoch_start(5)  # from_epoch + every: votes again
    assert dataset.targets.tolist() == [0, 0, 1, 1, -1, 1, -1] and len(probe.modes) == 6
    state = callback.state_dict()
    callback.on_train_end([])

    # a run resumed between two votes continues on the checkpoint's labels, and only on those
    resumed = PseudoLabels(dataset, probe, probe.embed, from_epoch=2, k=2, agreement=1.0, device="cpu", every=3)
    dataset.data[4, 0, 0] = torch.tensor(_pixels(10), dtype=torch.uint8)  # a vote now would label it again
    resumed.load_state_dict(state)
    resumed.on_epoch_start(6)
    assert dataset.targets.tolist() == [0, 0, 1, 1, -1, 1, -1] and len(probe.modes) == 6
    resumed.on_epoch_start(8)
    assert dataset.targets.tolist() == voted and len(probe.modes) == 7
    resumed.on_train_end([])  # back to the starting labels, which the next runs start from
    at_a_vote = PseudoLabels(dataset, probe, probe.embed, from_epoch=2, k=2, agreement=1.0, device="cpu", every=3)
    at_a_vote.load_state_dict(state)  # resumed at a vote's epoch: votes, with the weights it has now
    at_a_vote.on_epoch_start(5)
    assert dataset.targets.tolist() == voted and len(probe.modes) == 8
    at_a_vote.on_train_end([])
    for nothing in ({}, {"labels": None}):  # an older checkpoint, or one from before the first vote
        before = PseudoLabels(dataset, probe, probe.embed, from_epoch=2, k=2, agreement=1.0, device="cpu", every=3)
        before.load_state_dict(nothing)
        before.on_epoch_start(2)
        assert before.state_dict()["labels"].tolist() == voted and before.state_dict()["labels"].dtype == torch.int64
        before.on_train_end([])
    with pytest.raises(DeephashError, match="epoch 7 trains on the pseudo labels of an earlier vote, but none were restored"):
        PseudoLabels(dataset, probe, probe.embed, from_epoch=2, k=2, agreement=1.0, device="cpu", every=3).on_epoch_start(6)
    start = torch.tensor([0, 0, 1, 1, -1, -1, -1])
    for bad in (torch.zeros(6, dtype=torch.int64), start.float(), torch.tensor([0, 0, 1, 1, -2, 0, 0]),
                torch.tensor([1, 0, 1, 1, 0, 0, 0]), [0, 0, 1, 1, 0, 0, 0]):
        with pytest.raises(DeephashError, match=r"pseudo labels to restore must be int64 \(7,\), >= -1, with the run's "):
            resumed.load_state_dict({"labels": bad})
    with pytest.raises(DeephashError, match="every >= 1, got 0"):
        PseudoLabels(dataset, probe, probe.embed, from_epoch=2, k=2, agreement=1.0, device="cpu", every=0)


def test_a_lower_agreement_labels_the_split_vote_with_the_lower_class():
    dataset, probe = _dataset(), _Probe()
    PseudoLabels(dataset, probe, probe.embed, from_epoch=1, k=2, agreement=0.5, device="cpu").on_epoch_start(1)
    assert dataset.targets.tolist() == [0, 0, 1, 1, 0, 1, 0]


def test_a_process_other_than_rank_zero_takes_the_broadcast_labels_without_computing():
    dataset, probe = _dataset(), _Probe()
    sent = torch.tensor([0, 0, 1, 1, 1, 1, 1])
    received: list[torch.Tensor] = []

    def broadcast(labels: torch.Tensor) -> torch.Tensor:  # in place, as torch.distributed.broadcast
        received.append(labels.clone())
        return labels.copy_(sent)

    callback = PseudoLabels(dataset, probe, probe.embed, from_epoch=1, k=2, agreement=1.0, device="cpu",
                            broadcast=broadcast, is_main=False)
    callback.on_epoch_start(1)
    assert probe.modes == [] and torch.equal(received[0], callback.start_labels)
    assert torch.equal(dataset.targets, sent)
    record: dict = {}
    callback.on_epoch_end(1, record)
    assert record["pseudo_labelled"] == 3
    callback.on_train_end([])  # the starting labels were not overwritten by the broadcast
    assert dataset.targets.tolist() == [0, 0, 1, 1, -1, -1, -1]


def _failing_embed(x: torch.Tensor) -> torch.Tensor:
    raise MemoryError("no room for the pass")


@pytest.mark.parametrize("is_main", [True, False])
def test_a_failed_pass_on_rank_zero_raises_on_every_rank_instead_of_hanging(is_main):
    dataset, probe = _dataset(), _Probe()

    def broadcast(labels: torch.Tensor) -> torch.Tensor:  # rank 0's failure signal reaches the others
        return labels.fill_(-2)

    callback = PseudoLabels(dataset, probe, _failing_embed, from_epoch=1, k=2, agreement=1.0, device="cpu",
                            broadcast=broadcast, is_main=is_main)
    with pytest.raises(MemoryError if is_main else DeephashError, match="no room" if is_main else "rank 0's pass failed"):
        callback.on_epoch_start(1)
    assert dataset.targets.tolist() == [0, 0, 1, 1, -1, -1, -1]
    alone = PseudoLabels(dataset, probe, _failing_embed, from_epoch=1, k=2, agreement=1.0, device="cpu")
    with pytest.raises(MemoryError):
        alone.on_epoch_start(1)


def test_mismatched_shapes_are_a_one_line_error():
    with pytest.raises(DeephashError, match=r"embeddings \(N, D\) and labels \(N,\), got \(4, 3\) and \(5,\)"):
        knn_pseudo_labels(torch.randn(4, 3), torch.zeros(5, dtype=torch.int64), 2, 0.5)
