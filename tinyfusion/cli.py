"""How a script ends: one line for a user error, a traceback only for a bug.

Every script's `__main__` is `run_script(main, parse_args)`. A `UserError` (tinyfusion/errors.py) is a
bad input (a path, a flag value, a checkpoint that does not fit, bad data), raised where the input is
checked with a message that names the input and the fix; `RunFailed` is a run that cannot go on
(diverged, a run folder in use, a full disk). Either prints `SCRIPT: error: MESSAGE` on one line of
stderr, from rank 0 only under torchrun, and exits with status 2 (`RunFailed`: 1). Any other exception,
a plain `ValueError` included, is a bug: its traceback is printed, followed by one line that says so,
and the exit status is 1. `--debug` (or TINYFUSION_DEBUG=1) keeps the traceback for every error.

torchrun adds its own failure report when a process exits non-zero; the first line is ours.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Callable

from .errors import RunFailed, UserError

USER_ERROR_STATUS = UserError.status


def is_rank_zero() -> bool:
    """Whether this process is rank 0 (or not distributed): the one that speaks for the run."""
    return os.environ.get("RANK", "0") == "0"


def one_line(message: str) -> str:
    """A multi-line message (e.g. a list of differing settings) as one line."""
    parts = [part.strip() for part in str(message).splitlines() if part.strip()]
    return "; ".join(parts).replace(":;", ":")


def report(script: str, error: BaseException) -> None:
    """Prints an error as `script: error: message` on one line of stderr (rank 0 only)."""
    if is_rank_zero():
        print(f"{script}: error: {one_line(str(error)) or type(error).__name__}", file=sys.stderr, flush=True)


def run_script(main: Callable, parse_args: Callable, argv: list[str] | None = None) -> None:
    """Parses the arguments, runs main(args), and turns user errors into one line and exit status 2.

    Args:
        main: the script's main(args).
        parse_args: the script's parse_args(argv); its parser may have a --debug flag (tinyfusion.args.Parser).
        argv: the arguments (default: sys.argv[1:]).
    """
    script = Path(sys.argv[0]).name
    args = parse_args(argv)
    debug = bool(vars(args).pop("debug", False)) or os.environ.get("TINYFUSION_DEBUG") == "1"
    try:
        main(args)
    except (UserError, RunFailed) as e:
        if debug:
            raise
        report(script, e)
        sys.exit(e.status)
    except KeyboardInterrupt:
        if debug:
            raise
        report(script, RunFailed("interrupted"))
        sys.exit(130)
    except Exception:
        traceback.print_exc()
        if is_rank_zero():
            print(f"{script}: internal error: the traceback above is a bug in the toolkit, not a problem with "
                  "your inputs; please report it with the command you ran", file=sys.stderr, flush=True)
        sys.exit(1)


__all__ = ["RunFailed", "USER_ERROR_STATUS", "UserError", "is_rank_zero", "one_line", "report", "run_script"]
