"""Everything that reads or writes a run directory: train, load, encode, evaluate, index, search.

The command line, the service and the report are thin shells over these functions; each takes a
run directory (see :mod:`deephash.runs.layout` for its files).
"""

from deephash.runs.data import channel_stats, eval_crop_fraction, load_split, model_input_shape, query_images, source_dataset
from deephash.runs.encoding import encode, encode_items, encode_resumable, encode_run, encode_sharded, encode_split
from deephash.runs.evaluation import evaluate_run, format_metrics
from deephash.runs.export import export_run
from deephash.runs.index_updates import add_items, index_status, remove_items
from deephash.runs.indexing import build_index, index_info, load_index, search_run
from deephash.runs.layout import CHECKPOINT_DIR, CONFIG_FILE, MODEL_FILE, SKIPPED_FILE
from deephash.runs.model_file import is_hash_model, load_run, save_model
from deephash.runs.training import train_run

__all__ = [
    "CHECKPOINT_DIR",
    "CONFIG_FILE",
    "MODEL_FILE",
    "SKIPPED_FILE",
    "add_items",
    "build_index",
    "channel_stats",
    "encode",
    "encode_items",
    "encode_resumable",
    "encode_run",
    "encode_sharded",
    "encode_split",
    "evaluate_run",
    "export_run",
    "format_metrics",
    "index_info",
    "index_status",
    "is_hash_model",
    "load_index",
    "load_run",
    "load_split",
    "eval_crop_fraction",
    "model_input_shape",
    "query_images",
    "remove_items",
    "save_model",
    "search_run",
    "source_dataset",
    "train_run",
]
