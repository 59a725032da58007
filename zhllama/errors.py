"""One exception type for mistakes the user can fix, and the CLI wrapper that prints it without a traceback.

Public API:
    UserError          bad input or configuration; the message names the file/field
    cli_entry(main)    UserError (and an OSError of the environment: full disk, read-only output) -> "error: ..." + exit 2;
                       installs zhllama.quiet's filters first (every stage command goes through here)
    emit(text)         print a CLI's result to standard output; a full disk or closed pipe there is a UserError
"""
from __future__ import annotations

import errno
import functools
import os
import sys

# OSErrors that are the environment's, not a bug: a full disk, a read-only or forbidden output, a closed pipe
_ENVIRONMENT = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EPIPE, errno.EFBIG,
                errno.ENAMETOOLONG, errno.EISDIR, errno.ENOTDIR, errno.ENOENT, errno.EEXIST, errno.EIO}


def _stdout_broken() -> None:
    """stdout cannot take more: point it at /dev/null so the interpreter's final flush adds no second error."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


class UserError(Exception):
    """Bad input or configuration: the message names the file/field and says what to do."""


def emit(text: str) -> None:
    """print() to standard output for a CLI's result: a full disk or closed pipe there is a UserError naming it."""
    try:
        print(text, flush=True)
    except OSError as e:
        _stdout_broken()
        raise UserError(f"standard output: {e.strerror or e} (the result could not be written)") from None


def cli_entry(fn):
    """Run a CLI main so that UserError becomes readable lines (one per problem, each "error: ...") and exit code 2.

    An OSError of the environment (full disk, read-only folder, closed pipe) is one line naming the file too: the
    write sites remove their partial output, this names what failed. Set ZHLLAMA_TRACEBACK=1 to see the full
    traceback when debugging.
    """

    @functools.wraps(fn)
    def wrapper(argv=None):
        from zhllama.quiet import install

        install()  # library warnings that carry no action for the user (zhllama.quiet.NOISE)
        try:
            return fn(argv)
        except UserError as e:
            if os.environ.get("ZHLLAMA_TRACEBACK"):
                raise
            for line in str(e).splitlines() or [type(e).__name__]:
                print(f"error: {line}", file=sys.stderr)
            return 2
        except OSError as e:
            if e.errno not in _ENVIRONMENT or os.environ.get("ZHLLAMA_TRACEBACK"):
                raise
            name = e.filename
            print(f"error: {name if name is not None else 'output'}: {e.strerror or e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
            return 130

    return wrapper
