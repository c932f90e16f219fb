"""Atomic file output: write a temporary file beside the destination, fsync it, rename it
over the destination, fsync the directory. Until the rename an existing destination is never
touched, and on any failure the temporary file is removed, so a crash or an error never
leaves a half-written file under the final name. Every writer of the package uses this.

A process killed mid-write (SIGKILL, power loss) cannot remove its temporary file. Each
temporary name therefore carries its owner: ``.<name>.<kind>-<pid>-<host>-<random>`` (host:
a hash of the host name, so that directories shared between machines are safe). Whenever a
new temporary file is created for a destination, the stale ones of that same destination are
removed: those of this host whose process no longer exists and that were last modified more
than :data:`STALE_AFTER_S` seconds ago (the age guards against a recycled PID being judged
alive too late, never the other way round). Files of a live process, of another host, of
another destination, or in the old name format without a PID are never touched.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from typing import IO

STALE_AFTER_S = 3600.0
TEMP_KINDS = ("tmp", "spool")


def _host_tag() -> str:
    return hashlib.sha256(socket.gethostname().encode("utf-8", "replace")).hexdigest()[:8]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # not a PID we can judge: keep the file
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: exists, owned by someone else
        return True
    return True


def clean_stale_temps(path: str, *, now: float | None = None) -> list[str]:
    """Remove the stale temporary files of destination ``path`` (module docstring); returns
    the paths removed. Never raises: cleaning is best effort."""
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    pattern = re.compile(
        rf"\.{re.escape(base)}\.(?:{'|'.join(TEMP_KINDS)})-(\d+)-{_host_tag()}-[0-9a-f]{{16}}"
    )
    now = time.time() if now is None else now
    removed = []
    try:
        entries = os.listdir(directory)
    except OSError:
        return removed
    prefix = f".{base}."
    for entry in entries:
        if not entry.startswith(prefix):
            continue
        m = pattern.fullmatch(entry)
        if m is None or _pid_alive(int(m.group(1))):
            continue
        full = os.path.join(directory, entry)
        try:
            st = os.lstat(full)
            if now - st.st_mtime > STALE_AFTER_S:
                os.unlink(full)
                removed.append(full)
        except OSError:
            continue
    return removed


def create_temp_beside(path: str, kind: str = "tmp", mode: int = 0o666) -> tuple[int, str]:
    """Create ``.<name>.<kind>-<pid>-<host>-<random>`` in the destination's directory, after
    removing stale ones of the same destination; returns (fd, path).

    Not ``mkstemp``: that creates mode 0600, while this honours the umask like a plain open,
    so the final file gets the permissions a user expects.
    """
    directory = os.path.dirname(os.path.abspath(path))
    base = os.path.basename(path)
    clean_stale_temps(path)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    if kind == "spool":
        flags = (flags & ~os.O_WRONLY) | os.O_RDWR
    owner = f"{os.getpid()}-{_host_tag()}"
    for _ in range(16):
        tmp = os.path.join(directory, f".{base}.{kind}-{owner}-{secrets.token_hex(8)}")
        try:
            return os.open(tmp, flags, mode), tmp
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
