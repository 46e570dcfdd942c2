"""Run-folder files: atomic writes (a reader or a resumed run never sees half a file), and the one
comparison of a folder's recorded settings with a command's."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Calls write(f) on a temporary file beside `path`, flushes it to disk, then renames it over `path`.

    The file gets the usual permissions (0666 minus the umask), not mkstemp's owner-only 0600, so
    teammates on a cluster can read what a run wrote.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
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
