"""What train.py and evaluate.py share: flag definitions and one-line errors."""

from __future__ import annotations

import sys
from typing import Callable

from absl import flags

from polar_tf.config import DATASETS


def define_data_flags() -> None:
    flags.DEFINE_enum("dataset", "mnist", list(DATASETS), "Dataset to use.")
    flags.DEFINE_string("data_dir", None, "Folder of IDX files (default: $POLAR_TF_DATA_DIR, then tfds).")
    flags.DEFINE_integer("seed", 0, "Random seed.")


def run_main(program: str, body: Callable[[], None]) -> None:
    """Runs `body`; user errors (bad values, missing or damaged files, a diverging loss) exit 1
    with one line."""
    try:
        body()
    except (ValueError, OSError, ArithmeticError) as e:
        sys.exit(f"{program}: error: {e}")
