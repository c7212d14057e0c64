"""Crash-safe file writing: temp file + rename, an append-only JSONL log, a run-folder lock.

A write that fails (full disk, I/O error) raises ``WriteFailed``, a one-line ``UsageError``
naming the file and the fix; the file it would have replaced is left as it was.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from .errors import UsageError

LOCK_NAME = ".lock"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class WriteFailed(UsageError):
    """Writing ``path`` failed with an OSError; the previous version of the file is intact."""

    def __init__(self, path: Path, error: OSError, then: str = "rerun the same command") -> None:
        self.path, self.error = Path(path), error
        reason = error.strerror or str(error) or type(error).__name__
        fix = "free some disk space" if error.errno in _DISK_FULL else "check the disk"
        super().__init__(f"could not write {path}: {reason}; {fix} and {then}")

    def then(self, then: str) -> WriteFailed:
        """The same failure with another next step, e.g. where a rerun resumes from."""
        return WriteFailed(self.path, self.error, then)


# Every file this process wrote, in order: the scripts end by saying where (``cli.run_main``).
_WRITTEN: dict[Path, None] = {}


def written_files() -> list[Path]:
    """The files written so far by ``atomic_write`` and ``append_jsonl``, each once."""
    return list(_WRITTEN)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp)`` on a temp file beside ``path``, fsync it, then rename over path.

    A crash at any moment leaves either the old file or the new one, never a torn one; an
    OSError (full disk, I/O error) raises WriteFailed and leaves the old file as it was.
    """
    path = Path(path)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
    except OSError as error:
        raise WriteFailed(path, error) from None
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp's 0600 would hide results from others
        os.replace(tmp, path)
        _WRITTEN[path] = None
    except OSError as error:
        raise WriteFailed(path, error) from None
    finally:
        with suppress(OSError):
            tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, payload: Any) -> None:
    write_text(path, json.dumps(payload, indent=2) + "\n")


def _write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is out (a short write is retried, an error raised)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line; on failure cut the file back so no torn line stays behind."""
    data = (json.dumps(record) + "\n").encode()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    except OSError as error:
        raise WriteFailed(path, error) from None
    _WRITTEN[Path(path)] = None
    try:
        end = os.lseek(fd, 0, os.SEEK_END)
        try:
            _write_all(fd, data)
        except OSError:
            with suppress(OSError):
                os.ftruncate(fd, end)
            raise
    except OSError as error:
        raise WriteFailed(path, error) from None
    finally:
        with suppress(OSError):
            os.close(fd)


def read_jsonl(path: Path) -> list[dict]:
    """Records of a JSONL log; a torn line (a crash or failed write mid-line) is skipped."""
    if not Path(path).exists():
        return []
    records = []
    for line in Path(path).read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def rewrite_jsonl(path: Path, records: list[dict]) -> None:
    write_text(path, "".join(json.dumps(r) + "\n" for r in records))


class FolderLocked(Exception):
    """Another process holds the folder's lock; ``holder`` says which, as far as known."""

    def __init__(self, folder: Path, holder: str) -> None:
        super().__init__(f"{folder} is locked by {holder}")
        self.folder, self.holder = folder, holder


@contextmanager
def folder_lock(folder: Path) -> Iterator[Path]:
    """Hold an exclusive advisory lock (``flock``) on ``folder/.lock`` for the block.

    The lock file names the holder (pid and host) while held and is emptied on release. The
    kernel drops the lock when the process dies, however it dies, so a killed run never
    leaves a stale lock. Raises FolderLocked at once if another process holds it.
    """
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise FolderLocked(Path(folder), _holder(fd)) from None
        with suppress(OSError):  # the name is for messages; the lock works without it
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
                      .encode() + b"\n", 0)
        try:
            yield path
        finally:
            with suppress(OSError):
                os.ftruncate(fd, 0)  # still locked: nobody reads a half-emptied name
    finally:
        os.close(fd)  # releases the lock


def _holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode())
        return f"pid {int(info['pid'])} on host {info['host']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process (pid not yet written)"
