"""Benchmark: one trained network, two ways to make its codes (``model.code_rule``).

For each finished CSQ run with an auxiliary classifier (a run of a shipped ``fashion-mnist-*`` config),
the same weights encode the queries and the database twice:

* ``sign``: the sign of the hash head;
* ``posterior`` at each ``--temperature``: `deephash.models.posterior_codes`, the aux
  classifier's two likeliest classes' CSQ centers (the run's own ``build_loss`` centers).

A run with ``code_rule = "pca"`` (``fashion-mnist-open-48``) is encoded by ``sign`` and by its own
fitted ``pca`` rule (`deephash.models.pca_codes`).

and each pair is evaluated as ``deephash evaluate`` does (the run's splits, ``evaluate_codes``).
Training is unchanged by the rule, so the rows of one run differ only in the encoding.

Usage: ``python experiments/code_rules.py RUN [RUN ...] [--temperature 1 2]``; prints a Markdown table.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from deephash.config import Config
from deephash.models import channels_last_on_cpu
from deephash.runs import encode, load_run, load_split
from deephash.runs.components import build_loss
from deephash.models import build_model, model_spec
from deephash.retrieval.metrics import evaluate_codes

COLUMNS = ["mAP tie-aware", "mAP stable", "mAP@1000", "P@100", "P@r≤2", "empty r≤2", "kNN acc"]


def with_rule(model: torch.nn.Module, config: Config, rule: str, temperature: float = 1.0) -> torch.nn.Module:
    """A copy of a run's trained ``model`` with ``code_rule = rule`` (eval mode, CPU layout)."""
    spec = model_spec(model)
    spec.update(code_rule=rule, code_temperature=temperature)
    if rule != "pca":
        spec.update(code_source="features")
    rebuilt = build_model(spec)
    wanted = set(rebuilt.state_dict()) - {"code_centers"}  # a pca run's fitted buffers only under "pca"
    state = {k: v for k, v in model.state_dict().items() if k in wanted}
    result = rebuilt.load_state_dict(state, strict=False)
    if set(model.state_dict()) - {"code_centers", "code_mean", "code_projection"} - wanted or set(result.missing_keys) - {"code_centers"}:
        raise RuntimeError(f"the rebuilt model does not fit the trained weights: {result}")
    if rule == "posterior":
        rebuilt.set_code_centers(build_loss(config, int(spec["aux_classes"])).loss.centers)
    rebuilt.classes = getattr(model, "classes", [])
    return channels_last_on_cpu(rebuilt).eval()


def rows(run: Path, temperatures: list[float]) -> list[dict]:
    """One row of metrics per encoding rule of ``run``."""
    trained, config = load_run(run)
    query, database = load_split(config, config.data.query_split, run), load_split(config, config.data.database_split, run)
    out = []
    others = [("pca", 1.0)] if trained.code_rule == "pca" else [("posterior", t) for t in temperatures]
    for rule, temperature in [("sign", 1.0), *others]:
        model = with_rule(trained, config, rule, temperature)
        q_codes, q_labels = encode(model, query)
        db_codes, db_labels = encode(model, database)
        m = evaluate_codes(q_codes, q_labels, db_codes, db_labels, config.model.bits, ks=[100, 1000],
                           radius=2, knn_k=config.eval.knn_k, splits=(config.data.query_split, config.data.database_split))
        out.append({
            "run": run.name, "bits": config.model.bits, "rule": f"posterior T={temperature:g}" if rule == "posterior" else rule,
            "mAP tie-aware": m["mAP@all/tie-aware"], "mAP stable": m["mAP@all/stable"],
            "mAP@1000": m["mAP@1000/tie-aware"], "P@100": m["P@100/tie-aware"],
            "P@r≤2": m["P@r<=2"], "empty r≤2": m["P@r<=2/empty"], "kNN acc": m[f"kNN-acc@{config.eval.knn_k}"],
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--temperature", nargs="+", type=float, default=[2.0])
    args = parser.parse_args()
    torch.set_num_threads(2)
    print("| run | bits | codes | " + " | ".join(COLUMNS) + " |")
    print("|---|---:|---|" + "---:|" * len(COLUMNS))
    for run in args.runs:
        for row in rows(run, args.temperature):
            cells = " | ".join(f"{row[c]:.4f}" for c in COLUMNS)
            print(f"| {row['run']} | {row['bits']} | {row['rule']} | {cells} |", flush=True)


if __name__ == "__main__":
    main()
