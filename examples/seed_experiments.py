"""The seed's notebook experiments on Fashion-MNIST, with its imports changed to ``deephash``.

Runs, as the seed's notebook does, each experiment in turn and plots its 2-D embeddings of the
training and test images:

1. classification baseline: ``ClassificationNet(EmbeddingNet())`` + NLL loss, accuracy metric;
2. Siamese network: ``SiameseMNIST`` pairs, ``SiameseNet`` + ``ContrastiveLoss``;
3. triplet network: ``TripletMNIST`` triplets, ``TripletNet`` + ``TripletLoss``;
4. online pair selection: balanced batches, ``OnlineContrastiveLoss`` + ``HardNegativePairSelector``;
5.-8. online triplet selection: ``OnlineTripletLoss`` with ``AllTripletSelector``,
   ``HardestNegativeTripletSelector``, ``RandomNegativeTripletSelector`` and
   ``SemihardNegativeTripletSelector``, ``AverageNonzeroTripletsMetric``.

The notebook's code is kept: ``cuda = torch.cuda.is_available()`` passed to ``fit``,
``BalancedBatchSampler(train_dataset.train_labels, ...)``, ``model.get_embedding``, the seed's
learning rates, margins, batch sizes and ``StepLR(8, 0.1)``. What differs: the data come from
``deephash.load_dataset`` (images in [0, 1], not standardised by the notebook's torchvision
transform), ``--subset`` / ``--epochs`` shorten the run, and each experiment also reports the kNN
accuracy of its 2-D test embeddings against its training embeddings (k = 5, chance = 1 / 10).

    python examples/seed_experiments.py --out runs/seed-plots            # the notebook: 20 epochs
    python examples/seed_experiments.py --subset 2000 --epochs 4 --out /tmp/seed

Writes ``<out>/<experiment>_train.png``, ``<out>/<experiment>_test.png`` and ``<out>/results.json``
(per experiment: the ``fit`` history, the kNN accuracy, the seconds taken).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.optim as optim  # noqa: E402
from torch.optim import lr_scheduler  # noqa: E402

from deephash import (  # noqa: E402
    AccumulatedAccuracyMetric,
    AllTripletSelector,
    AverageNonzeroTripletsMetric,
    BalancedBatchSampler,
    ClassificationNet,
    ContrastiveLoss,
    EmbeddingNet,
    HardestNegativeTripletSelector,
    HardNegativePairSelector,
    OnlineContrastiveLoss,
    OnlineTripletLoss,
    RandomNegativeTripletSelector,
    SemihardNegativeTripletSelector,
    SiameseMNIST,
    SiameseNet,
    TripletLoss,
    TripletMNIST,
    TripletNet,
    fit,
    load_dataset,
)

fashion_mnist_classes = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle Boot"]
colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
          "#17becf"]
n_classes = 10
EXPERIMENTS = ("baseline", "siamese", "triplet", "online_contrastive", "online_triplet_all",
               "online_triplet_hardest", "online_triplet_random", "online_triplet_semihard")


def plot_embeddings(embeddings: np.ndarray, targets: np.ndarray, path: Path, title: str) -> None:
    """The notebook's scatter plot of 2-D embeddings, one colour per class, saved to ``path``."""
    plt.figure(figsize=(10, 10))
    for i in range(n_classes):
        inds = np.where(targets == i)[0]
        plt.scatter(embeddings[inds, 0], embeddings[inds, 1], alpha=0.5, color=colors[i])
    plt.legend(fashion_mnist_classes)
    plt.title(title)
    plt.savefig(path, dpi=60)
    plt.close()


def extract_embeddings(dataloader: torch.utils.data.DataLoader, model: torch.nn.Module, cuda: bool
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The notebook's ``extract_embeddings``: float ``(N, 2)`` embeddings and ``(N,)`` labels."""
    with torch.no_grad():
        model.eval()
        embeddings = np.zeros((len(dataloader.dataset), 2))
        labels = np.zeros(len(dataloader.dataset))
        k = 0
        for images, target in dataloader:
            if cuda:
                images = images.cuda()
            embeddings[k:k + len(images)] = model.get_embedding(images).data.cpu().numpy()
            labels[k:k + len(images)] = target.numpy()
            k += len(images)
    return embeddings, labels


def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, test_labels: np.ndarray,
                 k: int = 5) -> float:
    """Fraction of test points whose k nearest training points' majority label is theirs."""
    distances = ((test[:, None, :] - train[None, :, :]) ** 2).sum(-1)
    nearest = np.argsort(distances, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(test), n_classes))
    np.add.at(votes, (np.arange(len(test))[:, None], train_labels[nearest].astype(int)), 1)
    return float((votes.argmax(1) == test_labels).mean())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--subset", type=int, default=None, help="use the first N images of each split")
    parser.add_argument("--epochs", type=int, default=20, help="epochs per experiment (the notebook: 20)")
    parser.add_argument("--out", type=Path, default=Path("runs/seed-experiments"), help="folder for the plots")
    parser.add_argument("--only", nargs="*", choices=EXPERIMENTS, default=None, help="run these experiments only")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="batch size of the offline experiments (the notebook: 256, then 128)")
    parser.add_argument("--n-samples", type=int, default=25, help="images per class in an online batch")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)

    train_dataset = load_dataset("fashion-mnist", "train")
    test_dataset = load_dataset("fashion-mnist", "test")
    if args.subset is not None:
        train_dataset = train_dataset.subset(range(min(args.subset, len(train_dataset))))
        test_dataset = test_dataset.subset(range(min(args.subset, len(test_dataset))))

    cuda = torch.cuda.is_available()
    kwargs = {"num_workers": 1, "pin_memory": True} if cuda else {}
    results: dict[str, Any] = {}

    def run(name: str, model: torch.nn.Module, train_loader, test_loader, loss_fn, lr: float,
            log_interval: int, metrics: list | None = None) -> None:
        """The notebook's cell: Adam, StepLR(8, 0.1), fit, then the train and test embedding plots."""
        if args.only is not None and name not in args.only:
            return
        if cuda:
            model.cuda()
        optimizer = optim.Adam(model.parameters(), lr=lr)
        scheduler = lr_scheduler.StepLR(optimizer, 8, gamma=0.1, last_epoch=-1)
        tic = time.perf_counter()
        history = fit(train_loader, test_loader, model, loss_fn, optimizer, scheduler, args.epochs, cuda,
                      log_interval, metrics=metrics or [])
        seconds = time.perf_counter() - tic
        train_embeddings, train_labels = extract_embeddings(plain_train_loader, model, cuda)
        val_embeddings, val_labels = extract_embeddings(plain_test_loader, model, cuda)
        plot_embeddings(train_embeddings, train_labels, args.out / f"{name}_train.png", f"{name}: train")
        plot_embeddings(val_embeddings, val_labels, args.out / f"{name}_test.png", f"{name}: test")
        accuracy = knn_accuracy(train_embeddings, train_labels, val_embeddings, val_labels)
        results[name] = {"history": history, "knn_accuracy": accuracy, "seconds": seconds}
        print(f"{name}: train loss {history[0]['train_loss']:.4f} -> {history[-1]['train_loss']:.4f}, "
              f"kNN accuracy of the 2-D test embeddings {accuracy:.3f} ({seconds:.1f} s)", flush=True)

    # Baseline: classification with softmax
    batch_size = args.batch_size or 256
    train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=batch_size, shuffle=True, **kwargs)
    test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=batch_size, shuffle=False, **kwargs)
    plain_train_loader = torch.utils.data.DataLoader(train_dataset, batch_size=256, shuffle=False, **kwargs)
    plain_test_loader = torch.utils.data.DataLoader(test_dataset, batch_size=256, shuffle=False, **kwargs)
    embedding_net = EmbeddingNet()
    model = ClassificationNet(embedding_net, n_classes=n_classes)
    run("baseline", model, train_loader, test_loader, torch.nn.NLLLoss(), 1e-2, 50,
        metrics=[AccumulatedAccuracyMetric()])

    # Siamese network
    siamese_train_dataset = SiameseMNIST(train_dataset)  # random positive and negative pairs
    siamese_test_dataset = SiameseMNIST(test_dataset)
    batch_size = args.batch_size or 128
    siamese_train_loader = torch.utils.data.DataLoader(siamese_train_dataset, batch_size=batch_size, shuffle=True,
                                                       **kwargs)
    siamese_test_loader = torch.utils.data.DataLoader(siamese_test_dataset, batch_size=batch_size, shuffle=False,
                                                      **kwargs)
    margin = 1.
    embedding_net = EmbeddingNet()
    model = SiameseNet(embedding_net)
    run("siamese", model, siamese_train_loader, siamese_test_loader, ContrastiveLoss(margin), 1e-3, 100)

    # Triplet network
    triplet_train_dataset = TripletMNIST(train_dataset)  # random triplets
    triplet_test_dataset = TripletMNIST(test_dataset)
    triplet_train_loader = torch.utils.data.DataLoader(triplet_train_dataset, batch_size=batch_size, shuffle=True,
                                                       **kwargs)
    triplet_test_loader = torch.utils.data.DataLoader(triplet_test_dataset, batch_size=batch_size, shuffle=False,
                                                      **kwargs)
    embedding_net = EmbeddingNet()
    model = TripletNet(embedding_net)
    run("triplet", model, triplet_train_loader, triplet_test_loader, TripletLoss(margin), 1e-3, 100)

    # Online pair selection: batches of n_classes x n_samples, the hardest negative pairs
    train_batch_sampler = BalancedBatchSampler(train_dataset.train_labels, n_classes=10, n_samples=args.n_samples)
    test_batch_sampler = BalancedBatchSampler(test_dataset.test_labels, n_classes=10, n_samples=args.n_samples)
    online_train_loader = torch.utils.data.DataLoader(train_dataset, batch_sampler=train_batch_sampler, **kwargs)
    online_test_loader = torch.utils.data.DataLoader(test_dataset, batch_sampler=test_batch_sampler, **kwargs)
    embedding_net = EmbeddingNet()
    model = embedding_net
    run("online_contrastive", model, online_train_loader, online_test_loader,
        OnlineContrastiveLoss(margin, HardNegativePairSelector()), 1e-3, 50)

    # Online triplet selection, with each of the seed's triplet selectors
    selectors: dict[str, Callable[[], Any]] = {
        "all": AllTripletSelector,
        "hardest": lambda: HardestNegativeTripletSelector(margin),
        "random": lambda: RandomNegativeTripletSelector(margin),
        "semihard": lambda: SemihardNegativeTripletSelector(margin),
    }
    for selector_name, make_selector in selectors.items():
        embedding_net = EmbeddingNet()
        model = embedding_net
        run(f"online_triplet_{selector_name}", model, online_train_loader, online_test_loader,
            OnlineTripletLoss(margin, make_selector()), 1e-3, 50, metrics=[AverageNonzeroTripletsMetric()])

    (args.out / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


if __name__ == "__main__":
    main()
