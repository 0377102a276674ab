"""Atomic output files: write to a temporary file in the target folder, then rename.

A failed or interrupted job never leaves a partial output, and an existing
output is only replaced when the caller passes ``force=True``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import OutputError


def check_output(path: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Fail early (before any work) if ``path`` cannot be written."""
    p = Path(path)
    if p.exists() and p.is_dir():
        raise OutputError("is a directory, not a file", path=p)
    if p.exists() and not force:
        raise OutputError("already exists (use --force to overwrite)", path=p)
    check_parent(p)
    return p


def check_parent(p: Path) -> None:
    """The folder that will hold output ``p`` exists and is writable."""
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"folder {parent} does not exist", path=p)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder {parent} is not writable", path=p)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    The temporary file keeps the target's suffixes (so libraries that choose a
    format by extension, like nibabel, still do the right thing). On any
    exception the temporary file is removed and the target is untouched.
    """
    target = check_output(path, force=force)
    suffix = "".join(target.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=suffix, dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp_path, 0o666 & ~umask)
    try:
        yield tmp_path
        if not force and target.exists():
            raise OutputError("appeared while the job ran (use --force to overwrite)", path=target)
        os.replace(tmp_path, target)
    except OSError as exc:
        # A full disk, a quota, a folder turned read-only while the job ran: name the output
        # (the library that wrote it only knew the temporary file, or nothing).
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise OutputError(f"cannot be written: {exc.strerror or exc}", path=target) from exc
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes, *, force: bool = False) -> Path:
    with atomic_path(path, force=force) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str, *, force: bool = False) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), force=force)
