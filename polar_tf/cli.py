"""What the entry points share: a quiet start-up, flag definitions and parsing, one-line errors.

Each entry point (train.py, evaluate.py, `python -m polar_tf.export`, `python -m polar_tf.reproduce`)
calls `quiet_startup()` before anything imports Keras, parses its flags with `flags_parser(program)`
and runs its work with `run_main(program, body)`. This module imports nothing heavy for that reason.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Callable

from absl import flags

from polar_tf.config import DATASETS

VERBOSE_ENV = "POLAR_TF_VERBOSE"


def quiet_startup() -> None:
    """Hides TensorFlow's start-up logs, unless $POLAR_TF_VERBOSE is set (to anything but 0).

    Call it first, before Keras is imported. TF_CPP_MIN_LOG_LEVEL=3 (unless already set) hides what
    TensorFlow's C++ code logs once loaded, e.g. "failed call to cuInit" on a machine without a GPU.
    The lines its libraries log while they load (oneDNN and CUDA notices) ignore that variable, so
    Keras, and TensorFlow with it, is imported here with stderr pointed at /dev/null; an import
    error is still reported. TF_CPP_MIN_LOG_LEVEL=0 asks for every line and keeps them too.
    """
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0":
        return
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        import keras  # noqa: F401  (imports TensorFlow under the TensorFlow backend)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def define_data_flags() -> None:
    flags.DEFINE_enum("dataset", "mnist", list(DATASETS), "Dataset to use.")
    flags.DEFINE_string("data_dir", None, "Folder of IDX files (default: $POLAR_TF_DATA_DIR, then tfds).")
    flags.DEFINE_integer("seed", 0, "Random seed.")


def flags_parser(program: str) -> Callable[[list[str]], list[str]]:
    """absl's flag parser, for `app.run(main, flags_parser=...)`, with one-line errors.

    A bad or unknown flag, a missing required one or a positional argument exits 1 with
    `<program>: error: ...` instead of absl's two-line FATAL banner.

    Args:
      program: the name the error line starts with, e.g. "train.py".

    Returns:
      The parser: argv -> [argv[0]].
    """

    def parse(argv: list[str]) -> list[str]:
        try:
            rest = flags.FLAGS(argv)
        except flags.Error as e:
            sys.exit(f"{program}: error: {one_line(e)}")
        if len(rest) > 1:
            sys.exit(f"{program}: error: unexpected arguments {' '.join(rest[1:])}")
        return rest

    return parse


def run_main(program: str, body: Callable[[], None]) -> None:
    """Runs `body` and turns what a user can cause into one line on stderr, without a traceback.

    Bad values, missing or damaged files and a diverging loss exit 1 with `<program>: error: ...`;
    Ctrl-C exits 130 (128 + SIGINT, as a shell reports it) with `<program>: interrupted`, followed
    by what was kept if the interrupted code says so. What `body` wrote before is kept: files are
    written atomically. Attacks show their progress bars (`polar_tf.progress`).
    """
    from polar_tf import progress  # Here, not at the top: it imports Keras.

    interrupted = False

    def unraisable(info) -> None:
        # Python drops an exception raised in a __del__ or a weakref callback ("Exception ignored
        # in ..."). TensorFlow runs many, so a Ctrl-C landing in one was lost now and then: send it
        # again, from a thread, so that it lands after this hook has returned. After Ctrl-C, objects
        # it cut off half-built fail in their __del__ as the program exits: no news to the user.
        if interrupted:
            return
        if issubclass(info.exc_type, KeyboardInterrupt):
            threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGINT)).start()
        else:
            previous(info)

    progress.enable()
    previous, sys.unraisablehook = sys.unraisablehook, unraisable
    try:
        body()
    except (ValueError, OSError, ArithmeticError) as e:
        sys.exit(f"{program}: error: {one_line(e)}")
    except KeyboardInterrupt as e:
        interrupted = True
        print(f"{program}: interrupted" + (f"; {one_line(e)}" if str(e) else ""), file=sys.stderr)
        sys.exit(130)
    finally:
        if not interrupted:  # After Ctrl-C the hook stays for the exit.
            sys.unraisablehook = previous


def one_line(error: Exception) -> str:
    """An error's message on one line (its lines joined with "; "), or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__
