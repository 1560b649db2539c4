"""What the entry points share: a quiet start-up, flags made from configs, command lines, one-line errors.

Each entry point (train.py, evaluate.py, `python -m polar_tf.export`, `python -m polar_tf.reproduce`)
calls `quiet_startup()` before anything imports Keras, parses its flags with `flags_parser(program)`
and runs its work with `run_main(program, body)`. This module imports nothing heavy for that reason.

A config dataclass (`config.Config`, `evaluation_config.EvalConfig` and `AdaptiveConfig`,
`reproduction_protocol.Protocol`) is the one home of its settings: `define_config_flags` makes a
flag of each field (same name, same default, the help its docstring's Attributes section gives),
`config_from_flags` builds the config back from them, and `command_line` writes a config as the
command line that parses back to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import os
import re
import shlex
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Mapping, Sequence

from absl import flags


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


def define_data_dir_flag(flag_values: flags.FlagValues = flags.FLAGS) -> None:
    flags.DEFINE_string("data_dir", None, "Folder of IDX files (default: $POLAR_TF_DATA_DIR, then tfds).",
                        flag_values=flag_values)


def field_help(cls: type) -> dict[str, str]:
    """{field: its description} from a dataclass docstring's Attributes section, where an entry
    "a, b: text" describes both fields and deeper-indented lines continue the entry above."""
    helps: dict[str, str] = {}
    names: list[str] = []
    inside = False
    for line in (inspect.getdoc(cls) or "").splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if not line.strip():
            break
        if entry := re.fullmatch(r"  ([a-z_0-9]+(?:, [a-z_0-9]+)*): (.*)", line):
            names = entry.group(1).split(", ")
            for name in names:
                helps[name] = entry.group(2)
        else:
            for name in names:
                helps[name] += " " + line.strip()
    return helps


def define_config_flags(cls: type, defaults: Mapping[str, Any] | None = None,
                        flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Defines a flag for every field of the dataclass `cls`: its name, its default (or the one
    `defaults` gives), its help from the docstring; an enum where the field's metadata has "choices".

    A flag that another config already defined is shared when its default is the same (evaluate.py's
    --dataset, --eps, --seed... serve both suites); a different default is a programming error."""
    helps = field_help(cls)
    for field in dataclasses.fields(cls):
        name = field.name
        default = (defaults or {}).get(name, field.default)
        kind = _kind(field)
        if kind == "list" and default is not None:
            default = list(default)
        elif kind == "text":
            default = None if default is None or default == () else field.metadata["format"](default)
        if name in flag_values:
            if flag_values[name].default != default:
                raise ValueError(f"flag --{name} is defined twice with different defaults")
            continue
        if name not in helps:
            raise ValueError(f"{cls.__name__}'s docstring does not describe {name}")
        text = helps[name]
        if "choices" in field.metadata:
            flags.DEFINE_enum(name, default, list(field.metadata["choices"]), text, flag_values=flag_values)
        else:
            define = {"str": flags.DEFINE_string, "text": flags.DEFINE_string, "int": flags.DEFINE_integer,
                      "float": flags.DEFINE_float, "bool": flags.DEFINE_bool, "list": flags.DEFINE_list}[kind]
            define(name, default, text, flag_values=flag_values)


def config_from_flags(cls: type, values: Mapping[str, Any] | flags.FlagValues = flags.FLAGS, **overrides: Any) -> Any:
    """The config `cls` from flag values (parsed flags, or {name: value} of some fields: the others
    keep their defaults), with `overrides` on top. Raises ValueError for a value the config refuses."""
    if isinstance(values, flags.FlagValues):
        values = {field.name: values[field.name].value for field in dataclasses.fields(cls)}
    kwargs = {}
    for field in dataclasses.fields(cls):
        if field.name not in values:
            continue
        value, kind = values[field.name], _kind(field)
        if kind == "list" and value is not None:
            value = tuple(value)
        elif kind == "text":
            value = field.default if value in (None, "") else field.metadata["parse"](value)
        kwargs[field.name] = value
    return cls(**{**kwargs, **overrides})


def config_flags(config: Any, always: Sequence[str] = ()) -> list[str]:
    """The flags that `config_from_flags` turns back into `config`: --name=value for every field
    that differs from the config built with the fields `always` alone (those are always written)."""
    base = type(config)(**{name: getattr(config, name) for name in always})
    given = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)
             if f.name in always or getattr(config, f.name) != getattr(base, f.name)}
    for field in dataclasses.fields(config):  # a value derived from the others (a default of None) goes
        if field.default is None and field.name in given and field.name not in always:
            if type(config)(**{k: v for k, v in given.items() if k != field.name}) == config:
                del given[field.name]
    return [flag_text(f.name, given[f.name], f) for f in dataclasses.fields(config) if f.name in given]


def flag_text(name: str, value: Any, field: dataclasses.Field | None = None) -> str:
    """One flag as a command line writes it: --name=value, --name / --noname for a bool."""
    if field is not None and _kind(field) == "text":
        return f"--{name}={field.metadata['format'](value)}"
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if value is None:
        raise ValueError(f"--{name} cannot be written as a flag without a value")
    if isinstance(value, (tuple, list)):
        value = ",".join(str(v) for v in value)
    elif isinstance(value, float):
        value = repr(value)  # the shortest text that parses back to the same float
    return f"--{name}={value}"


def command_line(program: Sequence[str], configs: Sequence[Any] = (), leading: Mapping[str, Any] | None = None,
                 trailing: Mapping[str, Any] | None = None, always: Sequence[str] = ()) -> str:
    """The command that runs `program` (e.g. ["python", "train.py"]) with `configs` (see
    `config_flags`; a field two configs share is written once), between the flags that are no config
    field: `leading` first, `trailing` last (None values left out). Quoted for a POSIX shell."""
    args = list(program) + [flag_text(k, v) for k, v in (leading or {}).items() if v is not None]
    for config in configs:
        for flag in config_flags(config, [a for a in always if a in {f.name for f in dataclasses.fields(config)}]):
            if flag not in args:
                args.append(flag)
    args += [flag_text(k, v) for k, v in (trailing or {}).items() if v is not None]
    return shlex.join(args)


def _kind(field: dataclasses.Field) -> str:
    """How a field is given as a flag: str, int, float, bool, list (comma-separated) or text (parsed
    by its metadata's "parse", written by its "format")."""
    if "parse" in field.metadata:
        return "text"
    kinds = {"str": "str", "str | None": "str", "int": "int", "int | None": "int", "float": "float",
             "float | None": "float", "bool": "bool", "tuple[str, ...]": "list"}
    kind = kinds.get(field.type if isinstance(field.type, str) else field.type.__name__)
    if kind is None:
        raise ValueError(f"field {field.name} ({field.type}) has no flag type: give it parse and format metadata")
    return kind


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


class Interrupts:
    """Ctrl-C and SIGTERM as KeyboardInterrupt, remembering which came.

    Installed, SIGINT and SIGTERM both raise KeyboardInterrupt, as Ctrl-C does. `received` lists the
    signals that came: an interrupt that lands inside a C extension's callback can come out of it as
    that extension's own error (matplotlib's path code turns it into "ValueError: Invalid affine
    transformation matrix"), and `was_interrupted(error)` tells such an error from a real one.
    """

    def __init__(self):
        self.received: list[int] = []
        self._previous: dict[int, Any] = {}

    def _raise(self, signum, frame) -> None:
        self.received.append(signum)
        raise KeyboardInterrupt

    def install(self) -> "Interrupts":
        """Handles both signals, except an ignored SIGINT (a job started with `&`), which stays ignored."""
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signum == signal.SIGINT and signal.getsignal(signum) is signal.SIG_IGN:
                continue
            self._previous[signum] = signal.signal(signum, self._raise)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def was_interrupted(self, error: BaseException) -> bool:
        return isinstance(error, KeyboardInterrupt) or bool(self.received)

    @property
    def last_signal(self) -> int:
        """The signal of the interrupt (SIGINT when none came: a KeyboardInterrupt raised by hand)."""
        return self.received[-1] if self.received else signal.SIGINT


@contextlib.contextmanager
def interrupts_held() -> Iterator[Callable[[], None]]:
    """Within the block, SIGINT and SIGTERM wait: their handler runs when the block calls the
    function it is given, at a point where stopping is safe, or when the block ends.

    For `model.fit`, whose Python code builds TensorFlow's dataset and iterator objects: a
    KeyboardInterrupt raised in the middle of that (Ctrl-C landing just as an epoch starts) once
    left the process to die of a segmentation fault instead of exiting 130 (CI, under load; not
    reproduced in 15 runs here). Given to a Keras callback between batches, the interrupt comes
    out of fit as a callback's exception, the way fit expects exceptions, within a batch. Only a
    handler written in Python waits (Interrupts', or Python's default one raising
    KeyboardInterrupt); an ignored signal stays ignored. Outside the main thread it holds nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield lambda: None
        return
    held: list[tuple[int, Any]] = []
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    previous = {signum: handler for signum, handler in previous.items() if callable(handler)}

    def hold(signum, frame) -> None:
        held.append((signum, frame))

    def release() -> None:
        if held:
            for other, handler in previous.items():
                signal.signal(other, handler)
            signum, frame = held[0]
            held.clear()
            previous[signum](signum, frame)

    for signum in previous:
        signal.signal(signum, hold)
    try:
        yield release
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        release()  # also when the block raised: the interrupt came, and is reported as one


def run_main(program: str, body: Callable[..., None], prepare: Callable[[], Any] | None = None) -> None:
    """Runs `body` and turns what a user can cause into one line on stderr, without a traceback.

    `prepare`, if given, runs first and its result is `body`'s argument: the checks that need no
    Keras (a `Config` from the flags), whose ValueError is then answered before Keras loads.

    Bad values, missing or damaged files and a diverging loss exit 1 with `<program>: error: ...`;
    Ctrl-C exits 130 (128 + SIGINT, as a shell reports it) with `<program>: interrupted`, followed
    by what was kept if the interrupted code says so. SIGTERM (`kill`, a scheduler preempting the
    job; a job started with `&` ignores SIGINT) is an interrupt too, and exits 143 (128 + SIGTERM).
    An error raised after an interrupt came is the interrupt's doing (`Interrupts`) and is reported
    as the interrupt. What `body` wrote before is kept: files are written atomically. Attacks show
    their progress bars (`polar_tf.progress`). TensorFlow's start-up logs are hidden (`quiet_startup`):
    an entry point that imports Keras only in `body` parses its flags without loading it.
    """
    if prepare is not None:
        try:
            body = functools.partial(body, prepare())
        except ValueError as e:
            sys.exit(f"{program}: error: {one_line(e)}")
    quiet_startup()
    from polar_tf import progress  # Here, not at the top: it imports Keras.

    interrupted = False
    interrupts = Interrupts()

    def unraisable(info) -> None:
        # Python drops an exception raised in a __del__ or a weakref callback ("Exception ignored
        # in ..."). TensorFlow runs many, so a Ctrl-C landing in one was lost now and then: send it
        # again, from a thread, so that it lands after this hook has returned. After Ctrl-C, objects
        # it cut off half-built fail in their __del__ as the program exits: no news to the user.
        if interrupted:
            return
        if issubclass(info.exc_type, KeyboardInterrupt):
            threading.Timer(0.05, os.kill, (os.getpid(), interrupts.last_signal)).start()
        else:
            previous(info)

    progress.enable()
    previous, sys.unraisablehook = sys.unraisablehook, unraisable
    interrupts.install()
    try:
        body()
    except (KeyboardInterrupt, ValueError, OSError, ArithmeticError) as e:
        if not interrupts.was_interrupted(e):
            sys.exit(f"{program}: error: {one_line(e)}")
        interrupted = True
        said = one_line(e) if isinstance(e, KeyboardInterrupt) and str(e) else ""
        print(f"{program}: interrupted" + (f"; {said}" if said else ""), file=sys.stderr)
        sys.exit(128 + interrupts.last_signal)
    finally:
        interrupts.restore()
        if not interrupted:  # After Ctrl-C the hook stays for the exit.
            sys.unraisablehook = previous


def one_line(error: Exception) -> str:
    """An error's message on one line (its lines joined with "; "), or its type's name."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines) or type(error).__name__
