"""Checks on the files a command reads and writes, made before any work starts.

An output must never be an input (whatever the spelling: relative paths, `..`, symlinks and hard
links are resolved), and every output location must be writable, so a run does not fail after an
hour of compute, and never destroys what it was given.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Mapping

from .errors import UserError

PathArg = str | os.PathLike | None


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file or folder (symlinks, relative paths and hard links resolved)."""
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists():
        path = path.parent
    return path


def check_writable(flag: str, path: str | os.PathLike, *, folder: bool = False) -> None:
    """Raises a ValueError naming `flag` unless `path` can be written (created with its parents).

    Args:
        flag: the option that gave the path, for the message.
        path: a file to write, or a folder to write in (`folder`).
        folder: whether the path is a folder.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a file, not a folder; give a folder path")
    if not folder and path.is_dir():
        raise UserError(f"{flag} {str(path)!r} is a folder; give a file path (e.g. {str(path / 'out')!r} "
                         "plus the extension)")
    where = path if folder and path.exists() else path.parent
    anchor = _nearest_existing(where)
    if not anchor.is_dir():
        raise UserError(f"{flag} {str(path)!r} cannot be created: {str(anchor)!r} is a file, not a folder; "
                         "choose another path")
    try:  # a real probe: permissions, read-only file systems and quotas all show here (os.access does not)
        with tempfile.TemporaryFile(dir=anchor, prefix=".tinyfusion-write-check-"):
            pass
    except OSError as e:
        raise UserError(f"{flag} {str(path)!r} cannot be written ({e.strerror or e} in {str(anchor)!r}); "
                         "choose a writable location") from None


def check_outputs(outputs: Mapping[str, PathArg], inputs: Mapping[str, PathArg] | None = None,
                  folders: Mapping[str, PathArg] | None = None) -> None:
    """Refuses, before any work, an output that is an input or that cannot be written.

    Args:
        outputs: flag -> file the command writes (None or "" entries are skipped).
        inputs: flag -> file or folder the command reads.
        folders: flag -> folder the command writes in.
    Raises:
        UserError: naming the flags and the fix.
    """
    inputs, folders = inputs or {}, folders or {}
    given_inputs = {flag: p for flag, p in inputs.items() if p}
    for kind_folder, items in ((False, outputs), (True, folders)):
        for flag, out in items.items():
            if not out:
                continue
            for in_flag, inp in given_inputs.items():
                if same_path(out, inp):
                    raise UserError(f"{flag} {str(out)!r} is the same {'folder' if kind_folder else 'file'} as "
                                     f"{in_flag} {str(inp)!r}: writing it would destroy the input; choose another "
                                     f"{flag}")
            check_writable(flag, out, folder=kind_folder)
    written = [(flag, p) for flag, p in (*outputs.items(), *folders.items()) if p]
    for i, (flag_a, a) in enumerate(written):
        for flag_b, b in written[i + 1:]:
            if same_path(a, b):
                raise UserError(f"{flag_a} and {flag_b} are the same path {str(a)!r}: one output would overwrite "
                                 "the other; give them different paths")


def file_sha256(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def content_identity(path: str | os.PathLike | None) -> str | None:
    """What an input path holds, independent of how it is spelled or where it lies: a file's SHA-256; for a
    folder, the SHA-256 of its index.json (a features folder) or of its listing (names and sizes)."""
    if not path:
        return None
    path = Path(path)
    if path.is_file():
        return f"sha256:{file_sha256(path)}"
    if (path / "index.json").is_file():
        return f"index-sha256:{file_sha256(path / 'index.json')}"
    if path.is_dir():
        digest = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\t{file.stat().st_size}\n".encode())
        return f"listing-sha256:{digest.hexdigest()}"
    return f"missing:{os.path.abspath(path)}"


__all__ = ["check_outputs", "check_writable", "content_identity", "file_sha256", "same_path"]
