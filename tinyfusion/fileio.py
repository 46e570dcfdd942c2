"""Run-folder files: atomic writes (a reader or a resumed run never sees half a file), and the one
comparison of a folder's recorded settings with a command's."""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable

from .errors import UserError, WriteFailed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class _RecordingWriter(io.RawIOBase):
    """A binary file that remembers the first OSError of its writes: torch.save's zip writer turns a failed
    write into a RuntimeError of its own ("unexpected pos"), which no longer says why."""

    def __init__(self, file: BinaryIO):
        super().__init__()
        self.file, self.error = file, None

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self) -> None:
        self.file.flush()


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Calls write(f) on a temporary file beside `path`, flushes it to disk, then renames it over `path`.

    The file gets the usual permissions (0666 minus the umask), not mkstemp's owner-only 0600, so
    teammates on a cluster can read what a run wrote.

    Raises:
        WriteFailed: the file system refused (no space, no permission, read-only), naming the file and the
            cause; the temporary file is removed and whatever `path` held is left as it was.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            recorder = _RecordingWriter(f)
            try:
                write(recorder)
            except Exception as e:
                if recorder.error is not None:
                    raise recorder.error from e
                raise
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(e, OSError):
            raise WriteFailed(path, e) from e
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=1).encode()))


def setting_differences(recorded: dict, current: dict, *, ignore: Iterable[str] = (),
                        names: dict[str, str] | None = None) -> list[str]:
    """The settings that differ between what a run folder recorded and what this command asks, as lines.

    Args:
        recorded, current: JSON-like settings.
        ignore: keys that may differ (they do not change the result).
        names: how to call a key in the message (e.g. its flag); only these keys are compared when given.
    """
    keys = list(names) if names is not None else sorted(set(recorded) | set(current))
    ignore = set(ignore)
    return [f"{(names or {}).get(k, k)}: {recorded.get(k)!r} recorded, {current.get(k)!r} now"
            for k in keys if k not in ignore and recorded.get(k) != current.get(k)]


def truncate_jsonl(path: str | os.PathLike, step: int) -> None:
    """Drops the records of a JSON-lines log whose "step" is past `step` (and a torn last line), atomically:
    a run resumed from step `step` logs them again, and each step must appear once."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if isinstance(record, dict) and record.get("step", 0) <= step:
            kept.append(line)
    atomic_write(path, lambda f: f.write("".join(line + "\n" for line in kept).encode()))


def remove_orphan_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Deletes the temporary files of interrupted atomic writes (`.NAME.<random>.tmp`, see `atomic_write`) in a
    folder (not in its subfolders)."""
    removed = []
    folder = Path(folder)
    if folder.is_dir():
        for tmp in folder.glob(".*.tmp"):
            if tmp.is_file():
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
    return removed


class RunLock:
    """An exclusive claim on a run folder: FOLDER/run.lock names its owner (host, pid, command, start).

    A second run on the folder is refused with the owner's name. A lock left by a crash does not block
    forever: on the same host it is stale as soon as its process is gone; from another host (a shared
    file system) once its heartbeat (the file's time, touched every `heartbeat_s`) is older than `stale_s`.
    """

    NAME = "run.lock"

    def __init__(self, folder: str | os.PathLike, heartbeat_s: float = 60.0, stale_s: float = 600.0):
        self.path = Path(folder) / self.NAME
        self.heartbeat_s, self.stale_s = heartbeat_s, stale_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.removed_stale: dict | None = None

    def acquire(self) -> None:
        """Takes the lock (removing a stale one) or raises ValueError naming its owner."""
        me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
              "command": " ".join(sys.argv)}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if not self._stale(owner):
                    raise UserError(
                        f"the run folder {str(self.path.parent)!r} is in use by pid {owner.get('pid')} on "
                        f"{owner.get('host')} since {owner.get('started')} ({owner.get('command', '?')}); wait "
                        f"for that run to end or choose another --prefix (if no such run exists, delete "
                        f"{str(self.path)!r})") from None
                self.path.unlink(missing_ok=True)
                self.removed_stale = owner
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
            self._thread.start()
            return
        raise UserError(f"could not take the lock {str(self.path)!r}: another run keeps taking it")

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._owner().get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)

    def _owner(self) -> dict:
        try:
            owner = json.loads(self.path.read_text())
            return owner if isinstance(owner, dict) else {}
        except (OSError, json.JSONDecodeError):
            return {}  # gone, or written halfway by a process killed at that instant

    def _stale(self, owner: dict) -> bool:
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            try:
                os.kill(owner["pid"], 0)
            except ProcessLookupError:
                return True
            except PermissionError:  # alive, another user's
                return False
            return False
        return age > self.stale_s  # another host, or unreadable: trust the heartbeat

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the folder went away; the run notices on its next write

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
