"""Writing one output file or folder so that a failure is one named error and never half a file.

Public API (also importable from zhllama.runfolder, whose contract they serve):
    writing(path) -> context manager           around writes into PATH: OSError (full disk, read-only) and
                                               safetensors' wrapped I/O errors become a UserError naming PATH
    atomic_file(path) -> context manager -> Path
                                               a unique temporary path beside PATH, renamed onto PATH when the
                                               block ends without error, removed otherwise

A module of its own so that zhllama.manifest (which writes JSON atomically) and zhllama.runfolder (which writes
manifests) do not import each other.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from zhllama.errors import UserError

_UMASK = os.umask(0o022)
os.umask(_UMASK)


def _write_error(e: BaseException) -> str | None:
    """Why a write failed, when it failed for want of space or permission (OSError, or a library's wrapped one)."""
    if isinstance(e, OSError):
        if e.errno is None and "requested and" in str(e):  # numpy's short write: the disk filled up
            return f"No space left on device ({e})"
        return e.strerror or str(e) or type(e).__name__
    msg = str(e)
    if type(e).__name__ == "SafetensorError" and "I/O error" in msg:  # safetensors wraps the OS error in its own
        return msg.split("I/O error:", 1)[1].split("(os error")[0].strip()
    return None


@contextlib.contextmanager
def writing(path):
    """Around writes into PATH (a file, or a folder being filled): a full disk or a read-only or forbidden output
    becomes one UserError naming PATH instead of a traceback from deep inside the library that wrote."""
    try:
        yield
    except Exception as e:
        why = _write_error(e)
        if why is None:
            raise
        raise UserError(f"{path}: cannot write ({why}); nothing was published - free space or choose another "
                        "output") from None


@contextlib.contextmanager
def atomic_file(path):
    """Yield a unique temporary path beside PATH; rename it onto PATH if the block succeeds, else remove it.

    Unique names let two writers of one file never write into the same temporary file; OSError at any write
    (full disk, read-only folder) becomes one UserError naming PATH."""
    import tempfile

    path = Path(path)
    with writing(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets the mode open() would have given it
        os.close(fd)
    tmp = Path(tmp)
    try:
        with writing(path):
            yield tmp
            os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
