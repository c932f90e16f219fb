"""Atomic file output: write a temporary file beside the destination, fsync it, rename it
over the destination, fsync the directory. Until the rename an existing destination is never
touched, and on any failure the temporary file is removed, so a crash or an error never
leaves a half-written file under the final name. Every writer of the package uses this."""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
from collections.abc import Iterator
from typing import IO


def create_temp_beside(path: str) -> tuple[int, str]:
    """Create ``.<name>.tmp-<random>`` in the destination's directory; returns (fd, path).

    Not ``mkstemp``: that creates mode 0600, while this honours the umask like a plain open,
    so the final file gets the permissions a user expects.
    """
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(16):
        tmp = os.path.join(directory, f".{base}.tmp-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, flags, 0o666), tmp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "cannot find a free temporary file name", path)


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (skipped where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(tmp: str, dest: str) -> None:
    """Rename the (already fsynced and closed) temporary file onto ``dest``."""
    os.replace(tmp, dest)
    fsync_dir(os.path.dirname(os.path.abspath(dest)))


def remove_quietly(path: str | None) -> None:
    if path is None:
        return
    with contextlib.suppress(OSError):
        os.unlink(path)


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str], mode: str = "wb") -> Iterator[IO]:
    """``with atomic_output(p) as f: f.write(...)``: ``p`` appears only if the block succeeds."""
    dest = os.fspath(path)
    fd, tmp = create_temp_beside(dest)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        commit(tmp, dest)
        tmp = None
    finally:
        remove_quietly(tmp)
