"""Shared plumbing of the command-line scripts: one-line errors and exit codes.

Exit codes: 0 success, 1 some inputs failed (or an I/O error while writing), 2 usage
error (missing file or folder, bad config, bad weights or checkpoint, bad device),
130 interrupted (Ctrl-C). Bad input never prints a traceback; a bug still does.

Light on purpose (standard library + config.py): the scripts check their arguments with it
before importing torch, so a typo is answered in a fraction of a second.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import stat
import sys
from typing import Callable, Optional, Union

from modules.errors import error_line, printable

__all__ = ["DEFAULT_EXTENSIONS", "EXIT_OK", "EXIT_FAILED", "EXIT_USAGE", "EXIT_INTERRUPTED", "UsageError", "run_cli",
           "check_config_file", "check_dir", "check_file", "check_output_file", "HelpFormatter", "device_arg", "int_at_least",
           "int_between",
           "add_model_arguments", "add_logging_arguments", "setup_logging"]

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

#: file extensions treated as videos (case-insensitive); here so the CLI's --help needs no torch
DEFAULT_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".wmv", ".flv", ".3gp", ".ts", ".mts", ".ogv",
)

logger = logging.getLogger(__name__)


class UsageError(ValueError):
    """A problem with the arguments (missing directory, bad option): exit code 2."""


def check_dir(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UsageError(f"{what} not found: {path}")
    if not os.path.isdir(path):
        raise UsageError(f"{what} is not a directory: {path}")


def check_file(path: str, what: str) -> None:
    if not os.path.lexists(path):
        raise UsageError(f"{what} not found: {path}")


def check_output_file(path: Optional[str], flag: str = "--output") -> None:
    """A results file the run will replace (None: none asked for), checked before any work.

    Refused: an empty name, and an existing path that is not a regular file (a device, a
    FIFO, a folder): the atomic rename would replace a device or FIFO by a regular file.
    A missing file is fine (its folders are created when it is written).
    """
    if path is None:
        return
    if not path:
        raise UsageError(f"{flag} is empty")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as err:
        raise UsageError(f"{flag} {printable(path)}: cannot check it ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        from modules.json_input import file_kind

        raise UsageError(f"{flag} {printable(path)} exists and is not a regular file: this is "
                         f"{file_kind(info.st_mode)}")


def check_config_file(path: Optional[str]) -> None:
    """Parse and validate a config JSON (ConfigError on problems); None = defaults."""
    if path is not None:
        from config import from_json

        from_json(path)


def _usage_error_types() -> tuple:
    """Exception types meaning "the user's input is wrong"; heavy modules only if loaded."""
    from config import ConfigError

    types = [UsageError, ConfigError]
    for module, name in (("modules.clip_weights", "WeightsError"), ("unified_model", "CheckpointError"),
                         ("unified_model", "DeviceError")):
        loaded = sys.modules.get(module)
        if loaded is not None:
            types.append(getattr(loaded, name))
    return tuple(types)


def run_cli(job: Callable[[], int], interrupted_hint: Union[str, Callable[[], str]] = "") -> int:
    """Run ``job`` and turn expected failures into a one-line message and an exit code.

    Log records go through tqdm's writer while the job runs, so a line logged under a
    progress bar starts on its own line instead of being glued to the bar.
    ``interrupted_hint`` (text, or a function asked at Ctrl-C time) follows "interrupted: ".
    """
    from tqdm.contrib.logging import logging_redirect_tqdm

    for stream in (sys.stdout, sys.stderr):
        # a non-UTF-8 file name (a lone surrogate after decoding) prints as \udcXX, never crashes
        with contextlib.suppress(AttributeError, ValueError):
            stream.reconfigure(errors="backslashreplace")
    try:
        with logging_redirect_tqdm():
            return job()
    except KeyboardInterrupt:
        hint = interrupted_hint() if callable(interrupted_hint) else interrupted_hint
        print("interrupted" + (f": {hint}" if hint else ""), file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as err:  # noqa: BLE001 - classified below, bugs re-raised
        if isinstance(err, _usage_error_types()):
            print(f"error: {error_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        if isinstance(err, OSError):
            print(f"error: {error_line(err)}", file=sys.stderr)
            return EXIT_FAILED
        raise


# ----------------------------------------------------------------------------- argparse helpers


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's help ends with its default, unless the help text already states it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not action.option_strings or action.default is argparse.SUPPRESS or "default:" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.nargs == 0:  # store_true flags
            return f"{text} (default: off)"
        if action.default is None:
            return f"{text} (default: none)"
        return f"{text} (default: %(default)s)"


def device_arg(value: str) -> str:
    """argparse type for --device: auto, cpu, cuda or cuda:N."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {value!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type for integers >= ``minimum``."""
    return int_between(minimum, None)


def int_between(minimum: int, maximum: Optional[int]) -> Callable[[str], int]:
    """argparse type for integers in ``minimum..maximum`` (None: no upper bound)."""
    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {value!r}") from None
        if maximum is None and number < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {number}")
        if maximum is not None and not minimum <= number <= maximum:
            raise argparse.ArgumentTypeError(f"must be between {minimum} and {maximum}, got {number}")
        return number

    parse.__name__ = f"integer >= {minimum}" if maximum is None else f"integer {minimum}-{maximum}"
    return parse


def seconds_arg(value: str) -> float:
    """argparse type for a finite number of seconds >= 0."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {value!r}") from None
    if not (number >= 0 and number != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return number


def add_window_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--window_seconds / --window_stride (long videos as a timeline of windows)."""
    group = parser.add_argument_group("long videos")
    group.add_argument("--window_seconds", type=seconds_arg, default=None,
                       help="cut each video into windows of this many seconds, each sampled and encoded like a "
                            "short video (0 = never; default: the config's window_seconds, which windows only "
                            "videos longer than 10 minutes, with 30 s windows)")
    group.add_argument("--window_stride", type=seconds_arg, default=None,
                       help="seconds between window starts, > 0 and <= --window_seconds (default: the window "
                            "length: windows side by side)")
    return group


def add_model_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """--config_path/--config, --clip_weights, --checkpoint, --device: the same in every script."""
    group = parser.add_argument_group("model")
    group.add_argument("--config_path", "--config", dest="config_path", default=None,
                       help="model config JSON (default: the built-in defaults, which equal "
                            "configs/unified_model_config.json, or the checkpoint's own config)")
    group.add_argument("--clip_weights", default=None,
                       help="CLIP weights: a local file or Hugging Face folder, a model name (ViT-B/32), "
                            "open_clip:NAME/TAG, or 'random' (random init, for offline smoke runs); default: the config's clip_weights (null = OpenAI's official "
                            "weights, downloaded once to ~/.cache/clip)")
    group.add_argument("--checkpoint", default=None,
                       help="trained checkpoint written by train_unified_model.py, or TempMe's best.pth "
                            "(tempme:PATH) (default: none, i.e. untrained LoRA and prompts)")
    group.add_argument("--device", type=device_arg, default="auto",
                       help="auto (the config's device; its default auto = CUDA when available, else CPU), "
                            "cpu, cuda or cuda:N")
    return group


def add_logging_arguments(parser: argparse.ArgumentParser, quiet_help: str) -> None:
    group = parser.add_argument_group("logging").add_mutually_exclusive_group()
    group.add_argument("--verbose", "-v", action="store_true", help="debug logging")
    group.add_argument("--quiet", "-q", action="store_true", help=quiet_help)


def setup_logging(verbose: bool, quiet: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s: %(message)s")
