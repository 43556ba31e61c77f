"""An exclusive lock on a study's run folder, so two runs never write into one folder.

The lock is ``fcntl.flock`` on ``<run_dir>/.ridgeline.lock``; the kernel releases it when
the holder exits in any way (return, exception, Ctrl-C, ``kill -9``), so a lock can never
outlive its process. The holder writes its pid and host into the file: a second run is
refused at once with that pid in the message, and a file naming a process that no longer
runs is a stale lock, taken over. Where the file system has no ``flock`` (some network
mounts) the pid alone decides: the lock is held while the named process is alive.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import time
from pathlib import Path

from ridgeline.errors import RunInUseError

__all__ = ["RunLock", "LOCK_NAME"]

LOCK_NAME = ".ridgeline.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """Exclusive lock on a run folder; use as a context manager.

    Parameters
    ----------
    run_dir : path
        The run folder (must exist).

    Attributes
    ----------
    stale : dict or None
        After :meth:`acquire`, the holder recorded by a previous run that died holding the
        lock (its ``pid``, ``host``, ``started``), or None.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.stale: dict | None = None
        self._fd: int | None = None
        self._flock = True

    def _holder(self) -> dict | None:
        try:
            text = self.path.read_text()
        except (OSError, UnicodeDecodeError):
            return None
        try:
            holder = json.loads(text)
        except json.JSONDecodeError:
            return None
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None

    def _refuse(self, holder: dict | None) -> RunInUseError:
        who = (f"process {holder['pid']} on {holder.get('host', '?')} (started "
               f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('started', 0)))})"
               if holder else "another process")
        return RunInUseError(
            f"the run folder {self.path.parent} is in use by {who}: two studies in one folder "
            "would mix their results. Wait for that run to finish (or stop it), or pass another "
            "--out folder.")

    def acquire(self) -> RunLock:
        """Take the lock or raise :class:`RunInUseError` at once (never waits)."""
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX: the recorded pid decides
            fcntl = None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            if fcntl is None:
                raise OSError(errno.ENOSYS, "no fcntl.flock on this platform")
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder()
            os.close(fd)
            raise self._refuse(holder) from None
        except OSError as exc:
            if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                os.close(fd)
                raise
            self._flock = False  # no flock here: the recorded pid decides
        previous = self._holder()
        if previous is not None:
            mine = previous.get("host") == socket.gethostname()
            if not self._flock and (not mine or _alive(previous["pid"])) \
                    and previous["pid"] != os.getpid():
                os.close(fd)
                raise self._refuse(previous)
            # With flock, holding the lock proves the recorded process is gone.
            self.stale = previous
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.time()}).encode()
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, record)
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Clear the holder record and release the lock (idempotent)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty file: no holder (the file stays; see below)
        finally:
            os.close(fd)  # closing the descriptor releases the flock
        # The file is not deleted: unlinking a flock'ed file lets a waiting opener lock a
        # removed inode while a third process locks a new file, both believing they hold it.

    def __enter__(self) -> RunLock:
        return self.acquire() if self._fd is None else self

    def __exit__(self, *exc) -> None:
        self.release()
