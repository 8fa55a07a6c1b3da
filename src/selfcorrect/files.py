"""Writing the files a command is asked for: its output path checked before anything runs, and the file written
whole or not at all."""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path

from .errors import UserError


def check_output_file(path: Path, flag: str) -> None:
    """Refuse (UserError naming `flag`) an output file path that is a directory or lies in one that is missing."""
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give the path of the file to write")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: no such directory {path.parent}; create it first")


def write_atomically(path: Path, text: str, flag: str = "--output") -> None:
    """Write `text` to `path` through a temporary file beside it renamed over it: a reader (or a crash, or
    Ctrl-C) sees the old file or the whole new one, never half of it. A symbolic link is written through (the
    file it names is replaced, keeping its permissions); what is not a regular file (/dev/stdout, a pipe) is
    written to directly. A failure to write is a UserError naming `flag`."""
    path = Path(os.path.realpath(path))
    if path.exists() and not path.is_file():
        try:
            with path.open("w", encoding="utf-8", newline="") as handle:
                handle.write(text)
        except OSError as error:
            raise UserError(f"{flag} {path}: cannot write it ({error.strerror or error})") from None
        return
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8", newline="") as handle:
            handle.write(text)
        if path.exists():
            os.chmod(temporary, stat.S_IMODE(path.stat().st_mode))
        os.replace(temporary, path)
    except BaseException as error:  # Ctrl-C too: no half-written file stays behind
        with contextlib.suppress(OSError):
            temporary.unlink()
        if isinstance(error, OSError):
            raise UserError(f"{flag} {path}: cannot write it ({error.strerror or error})") from None
        raise
