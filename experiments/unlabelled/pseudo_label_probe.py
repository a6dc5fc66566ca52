"""Issue-26 probe: how many of a semi-supervised run's unlabelled training images its final model
would pseudo-label, and how many of those labels are right.

For each run (a ``deephash train`` directory with ``data.labelled_fraction < 1``): its training
split as training saw it (the kept labels, -1 elsewhere), one pass of the trained model (the hash
head's tanh codes at scale 1, as ``pseudo_labels`` votes), then ``knn_pseudo_labels`` at the run's
``pseudo_labels.k`` and ``agreement`` (or those given), scored against the true labels that the
data set has and training never read.

Usage: ``python experiments/unlabelled/pseudo_label_probe.py RUN [RUN ...] [--k 10] [--agreement 0.9]``
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from deephash.runs import load_run, load_split
from deephash.train.pseudo_labels import knn_pseudo_labels


@torch.no_grad()
def probe(run: str, k: int | None, agreement: float | None) -> dict[str, float]:
    model, config = load_run(run, device="cpu")
    k = k or config.pseudo_labels.k
    agreement = agreement or config.pseudo_labels.agreement
    seen = load_split(config, config.data.train_split, run, training=True)
    full = load_split(dataclasses.replace(config, data=dataclasses.replace(config.data, labelled_fraction=1.0)),
                      config.data.train_split, run, training=True)
    embeddings = torch.cat([model.relaxed(seen.data[i:i + 1024].float().div_(255), scale=1.0)
                            for i in range(0, len(seen.data), 1024)])
    voted = knn_pseudo_labels(embeddings, seen.targets, k, agreement)
    unlabelled = seen.targets < 0
    labelled = unlabelled & (voted >= 0)
    right = labelled & (voted == full.targets)
    return {"unlabelled": int(unlabelled.sum()), "pseudo_labelled": int(labelled.sum()),
            "coverage": float(labelled.sum() / unlabelled.sum()), "accuracy": float(right.sum() / labelled.sum().clamp(min=1)),
            "k": k, "agreement": agreement}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--k", type=int)
    parser.add_argument("--agreement", type=float)
    args = parser.parse_args()
    print("| run | k | agreement | pseudo-labelled / unlabelled | coverage | accuracy |")
    print("| --- | --- | --- | --- | --- | --- |")
    for run in args.runs:
        r = probe(run, args.k, args.agreement)
        print(f"| {run} | {r['k']} | {r['agreement']} | {r['pseudo_labelled']} / {r['unlabelled']} | "
              f"{r['coverage']:.3f} | {r['accuracy']:.3f} |")


if __name__ == "__main__":
    main()
