"""The store lock: two jobs building, checking or resuming the same store take turns.

Two jobs asking for the same content-addressed store (array tasks that differ only in their
grid) would otherwise both write it and delete each other's chunks. The lock is `flock` on a
sibling file `<store>.lock`; where the file system has no flock (Lustre mounted without
`-o flock`, some NFS setups) it falls back to an O_EXCL lock file, see `_exclusive_file_lock`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

# flock errors meaning "this file system has no flock" (Lustre mounted without -o flock: ENOSYS;
# some NFS setups: ENOLCK or EOPNOTSUPP). Any other error is a real failure and propagates.
NO_FLOCK_ERRNOS = (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK)
LOCK_POLL_SECONDS = 0.2
LOCK_HEARTBEAT_SECONDS = 30.0  # an O_EXCL lock holder touches its lock file this often
LOCK_STALE_SECONDS = 600.0  # an O_EXCL lock file untouched this long has lost its holder (another host)


@contextlib.contextmanager
def store_lock(paths: list[Path] | Path) -> Iterator[None]:
    """Hold exclusive locks on stores being checked, written or resumed.

    Two jobs asking for the same content-addressed store (array tasks that differ only in
    their grid) would otherwise both write it and delete each other's chunks. The lock is
    a sibling file `<store>.lock`, taken in sorted order so two lockers never deadlock.

    Where the file system has no flock (see NO_FLOCK_ERRNOS), the lock is instead the file
    `<store>.lock.owner`, created with O_EXCL and holding the holder's pid and host; see
    `_exclusive_file_lock` for how a holder that died is detected.
    """
    paths = sorted({Path(p) for p in ([paths] if isinstance(paths, (str, Path)) else paths)})
    with contextlib.ExitStack() as stack:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock_path = path.with_name(path.name + ".lock")
            handle = stack.enter_context(open(lock_path, "w"))
            try:
                fcntl.flock(handle, fcntl.LOCK_EX)
            except OSError as error:
                if error.errno not in NO_FLOCK_ERRNOS:
                    raise
                stack.enter_context(_exclusive_file_lock(lock_path.with_name(lock_path.name + ".owner")))
        yield


def _read_holder(owner: Path) -> tuple[str, float] | None:
    """(raw content, age in seconds) of lock file `owner`, or None if it is gone."""
    try:
        return owner.read_text(), time.time() - owner.stat().st_mtime
    except FileNotFoundError:
        return None


def _holder_is_gone(raw: str, age: float) -> str | None:
    """Why the holder described by lock-file content `raw` is gone (dead pid on this host, or stale), else None."""
    try:
        holder = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        holder = {}  # a holder killed between creating and filling the file: only its age tells
    if not isinstance(holder, dict):
        holder = {}
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"its holder pid {holder['pid']} on {holder['host']} has exited"
        except PermissionError:
            pass  # alive, owned by another user
    # A live holder touches the file every LOCK_HEARTBEAT_SECONDS; this also catches a reused pid.
    if age > LOCK_STALE_SECONDS:
        return (
            f"it was last refreshed {age:.0f}s ago (holder {holder or 'unknown'}; "
            f"stale after {LOCK_STALE_SECONDS:.0f}s)"
        )
    return None


def _take_over(owner: Path, stale: str, reason: str) -> None:
    """Remove lock file `owner` whose content `stale` belongs to a gone holder, unless another waiter got there first.

    Renaming is atomic: of two waiters that both judged the holder gone, one renames the file
    away. If what it renamed is not the stale content (the other waiter already took the lock
    over and wrote its own), it links that back: a live lock is never removed.
    """
    moved = owner.with_name(f"{owner.name}.{socket.gethostname()}.{os.getpid()}.stale")
    try:
        os.rename(owner, moved)
    except FileNotFoundError:
        return
    try:
        if moved.read_text() == stale:
            print(f"store lock {owner}: taking it over, {reason}", file=sys.stderr, flush=True)
        else:
            with contextlib.suppress(FileExistsError):
                os.link(moved, owner)
    finally:
        moved.unlink(missing_ok=True)


@contextlib.contextmanager
def _exclusive_file_lock(owner: Path) -> Iterator[None]:
    """A lock for file systems without flock: create `owner` with O_EXCL (atomic on Lustre, NFSv3+, local fs).

    The file holds {pid, host}. A waiter removes it when its holder is gone: on the same host,
    when that pid no longer exists; from another host, when the file's mtime is older than
    LOCK_STALE_SECONDS (the holder touches it every LOCK_HEARTBEAT_SECONDS while it holds it).
    """
    announced = False
    while True:
        try:
            fd = os.open(owner, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            seen = _read_holder(owner)
            if seen is None:
                continue  # released meanwhile
            reason = _holder_is_gone(*seen)
            if reason:
                _take_over(owner, seen[0], reason)
                continue
            if not announced:
                print(f"store lock {owner}: waiting for its holder {seen[0].strip()}", file=sys.stderr, flush=True)
                announced = True
            time.sleep(LOCK_POLL_SECONDS)
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(LOCK_HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(owner)

    beat = threading.Thread(target=heartbeat, name=f"lock-heartbeat-{owner.name}", daemon=True)
    beat.start()
    try:
        yield
    finally:
        done.set()
        beat.join()
        owner.unlink(missing_ok=True)
