"""Names and markers of every file and folder stjfd writes.

One place for them, because two things depend on them: the modules that write the outputs, and the
output-safety policy (:mod:`stjfd_convert.atomic`), which replaces an existing path only when it can
tell from these markers that stjfd wrote it. A leaf module: it imports nothing from the package.
"""

from __future__ import annotations

# A converted-model folder (`stjfd convert`, a run's last/ and best/).
CONVERTED_FORMAT = "stjfd-converted"
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "model.stjfd.json"
PICKLE_FILE = "model.pt"  # only for architectures that exist solely as a pickled module
STATE_FILE = "training_state.pt"  # in a run's last/
CONVERTED_ENTRIES = frozenset({WEIGHTS_FILE, MANIFEST_FILE, PICKLE_FILE, STATE_FILE})

# A fine-tuning run folder (`stjfd finetune -o`).
RUN_FORMAT = "stjfd-finetune-run"
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "run.log"
CURVE_FILE = "training_curve.png"
LAST_DIR = "last"
BEST_DIR = "best"
RUN_FILES = frozenset({CONFIG_FILE, METRICS_FILE, LOG_FILE, CURVE_FILE})
RUN_CHECKPOINTS = frozenset({LAST_DIR, BEST_DIR})

# The folder `stjfd demo -o DIR` fills.
DEMO_CONVERTED_DIR = "sample-stjfd"
DEMO_RUN_DIR = "finetune"

# Single files: an ONNX graph (its ModelProto.producer_name), a Markdown report (its first line),
# a PNG (its tEXt "Software" chunk).
ONNX_PRODUCER = "stjfd"
ONNX_EXTERNAL_SUFFIX = ".data"
MARKDOWN_TITLE = "# stjfd "
PNG_SOFTWARE = "stjfd"
