"""Check deephash's timm path against timm itself: weights saved by timm, loaded both ways, give
timm's own outputs; the input settings are timm's; a run trains, resumes and evaluates on them.

timm needs torchvision, which does not import beside the CPU torch the project pins, so this runs
in an environment that has timm (and deephash installed with ``--no-deps``), not in ``make test``:

    python3 -m venv /tmp/timmvenv
    /tmp/timmvenv/bin/pip install torch torchvision timm safetensors faiss-cpu tqdm matplotlib scikit-learn tomli-w pillow
    /tmp/timmvenv/bin/pip install -e . --no-deps
    /tmp/timmvenv/bin/python scripts/check_timm.py --model resnet10t --work /tmp/timm-check

Steps, each printed with its result; the exit status is 1 if any fails:

1. ``timm.create_model(MODEL)`` with random weights, saved by timm itself
   (``timm.models.save_for_hf``: ``model.safetensors`` + ``config.json``, what the hub holds).
2. deephash's ``timm:MODEL`` backbone from that file through ``model.pretrained_path``: the same
   tensors, and the same features as timm's model (``num_classes=0``) on random images.
3. The same through ``model.pretrained = true``: timm's own weight loading, pointed at the local
   file with ``backbone_params.pretrained_cfg_overlay = {file = ...}`` (what timm does with its
   hub cache), the same features again.
4. ``timm_input_config`` equals timm's pretrained configuration (mean, std, input size).
5. ``deephash train`` on a small generated photo folder from those weights (2 short epochs, the
   first with a frozen backbone, a tenth of the rate for the backbone, the input size left to
   timm), then ``evaluate``: the run's config holds timm's mean, std and size.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def check(name: str, ok: bool, detail: str = "") -> bool:
    print(f"[{'ok' if ok else 'FAIL'}] {name}{': ' + detail if detail else ''}", flush=True)
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet10t", help="a small timm model name")
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args(argv)
    import timm
    from timm.models import save_for_hf

    from deephash.config import config_from_dict
    from deephash.models import build_model, timm_input_config
    from deephash.runs.components import with_pretrained_inputs

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    results = []
    torch.manual_seed(0)
    reference = timm.create_model(args.model, pretrained=False, num_classes=0).eval()
    save_for_hf(reference, work / "hub", safe_serialization=True)
    weights = work / "hub" / "model.safetensors"
    results.append(check("timm saved its weights", weights.is_file(), str(weights)))
    images = torch.rand(4, 3, 96, 96)
    with torch.no_grad():
        expected = reference(images)

    spec = {"backbone": f"timm:{args.model}", "in_channels": 3, "bits": 32}
    for how, extra in (("model.pretrained_path", {"pretrained_path": str(weights)}),
                       ("model.pretrained (timm's loader, local file)",
                        {"pretrained": True, "backbone_params": {"pretrained_cfg_overlay": {"file": str(weights)}}})):
        backbone = build_model({**spec, **extra}).backbone.eval()
        same = all(torch.equal(backbone.state_dict()[k], v) for k, v in reference.state_dict().items())
        with torch.no_grad():
            diff = float((backbone(images) - expected).abs().max())
        results.append(check(f"{how}: timm's tensors and features", same and diff == 0.0, f"max |diff| = {diff:g}"))

    cfg = timm.get_pretrained_cfg(args.model)
    got = timm_input_config(args.model)
    results.append(check("input settings are timm's", got == {"mean": list(cfg.mean), "std": list(cfg.std),
                                                                "image_size": int(cfg.input_size[-1])}, json.dumps(got)))
    resolved = with_pretrained_inputs(config_from_dict({"data": {"dataset": "folder", "images": "x"},
                                                        "model": {"backbone": f"timm:{args.model}", "pretrained_path": str(weights)}}))
    results.append(check("a run's config takes them", resolved.data.image_size == int(cfg.input_size[-1])
                         and resolved.model.mean == list(cfg.mean)))

    photos = work / "photos"
    if not photos.is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_photo_collection.py"), "--out", str(photos),
                        "--n", "280"], check=True)
    run = work / "run"
    sets = [f"data.images={photos}", f"model.backbone=timm:{args.model}", "model.backbone_params={}",
            f"model.pretrained_path={weights}",
            "data.image_size=0", "train.epochs=2", "train.steps_per_epoch=3", "train.freeze_backbone_epochs=1",
            "optimizer.backbone_lr_scale=0.1", "data.num_workers=0", "device=cpu"]
    argv_train = [sys.executable, "-m", "deephash", "train", "photos-cpu-48", "--out", str(run), "--quiet"]
    for item in sets:
        argv_train += ["--set", item]
    if run.exists():
        subprocess.run(["rm", "-rf", str(run)], check=True)
    trained = subprocess.run(argv_train, capture_output=True, text=True)
    evaluated = subprocess.run([sys.executable, "-m", "deephash", "evaluate", str(run)], capture_output=True, text=True)
    results.append(check("deephash train / evaluate", trained.returncode == evaluated.returncode == 0,
                         (trained.stderr + evaluated.stderr)[-400:]))
    if (run / "config.toml").is_file():
        from deephash.config import load_config

        saved = load_config(run / "config.toml")
        results.append(check("the run's mean, std and size are timm's", saved.model.mean == list(cfg.mean)
                             and saved.model.std == list(cfg.std) and saved.data.image_size == int(cfg.input_size[-1])))
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
