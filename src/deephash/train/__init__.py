"""Training: the seed's ``fit`` loop, metrics, callbacks and checkpoint/resume."""

from deephash.train.callbacks import Callback, History, JsonlLogger, StopTraining, read_jsonl
from deephash.train.checkpoint import (
    CheckpointCallback,
    latest_checkpoint,
    load_checkpoint,
    read_checkpoint,
    save_checkpoint,
    unwrap_model,
)
from deephash.train.continuation import TanhContinuation
from deephash.train.ema import WeightAverage
from deephash.train.fit import evaluate_epoch, fit, train_epoch
from deephash.train.metrics import AccumulatedAccuracyMetric, AverageNonzeroTripletsMetric, Metric
from deephash.train.pseudo_labels import PseudoLabels, knn_pseudo_labels

__all__ = [
    "AccumulatedAccuracyMetric",
    "AverageNonzeroTripletsMetric",
    "Callback",
    "CheckpointCallback",
    "History",
    "JsonlLogger",
    "Metric",
    "PseudoLabels",
    "StopTraining",
    "TanhContinuation",
    "WeightAverage",
    "evaluate_epoch",
    "fit",
    "knn_pseudo_labels",
    "latest_checkpoint",
    "load_checkpoint",
    "read_checkpoint",
    "read_jsonl",
    "save_checkpoint",
    "train_epoch",
    "unwrap_model",
]
