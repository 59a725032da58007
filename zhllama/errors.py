"""One exception type for mistakes the user can fix, and the CLI wrapper that prints it without a traceback."""
from __future__ import annotations

import functools
import os
import sys


class UserError(Exception):
    """Bad input or configuration: the message names the file/field and says what to do."""


def cli_entry(fn):
    """Run a CLI main so that UserError becomes readable lines (one per problem, each "error: ...") and exit code 2.

    Set ZHLLAMA_TRACEBACK=1 to see the full traceback when debugging.
    """

    @functools.wraps(fn)
    def wrapper(argv=None):
        try:
            return fn(argv)
        except UserError as e:
            if os.environ.get("ZHLLAMA_TRACEBACK"):
                raise
            for line in str(e).splitlines() or [type(e).__name__]:
                print(f"error: {line}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
            return 130

    return wrapper
