"""How the package writes files: whole or not at all, and into caches no other user can write.

Every writer of the package (converter, sessions, training checkpoints, the demo checkpoint, benchmark results)
goes through these helpers, so that an interrupted write never leaves a half-written result where the user expects
one, and nothing is loaded from a directory another local user could have planted.
"""

import os
import secrets
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_directory(path: str | os.PathLike, mode: int = 0o700) -> Iterator[Path]:
    """Write the directory `path` whole or not at all.

    Yields a new empty directory beside `path` (permissions `mode`). When the block ends without an exception the new
    directory takes the place of `path` (`replace_directory`); on any exception, Ctrl-C included, it is removed and
    `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{path.name}.partial-", dir=path.parent))
    try:
        partial.chmod(mode)
        yield partial
        replace_directory(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def replace_directory(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished directory `new` to `path`. Anything at `path` is kept aside until `new` is in place, then
    deleted; if the move fails it is put back."""
    new, path = Path(new), Path(path)
    if not path.exists() and not path.is_symlink():
        os.rename(new, path)
        return
    aside = path.with_name(f".{path.name}.old-{secrets.token_hex(4)}")
    os.rename(path, aside)
    try:
        os.rename(new, path)
    except BaseException:
        os.rename(aside, path)
        raise
    if aside.is_dir() and not aside.is_symlink():
        shutil.rmtree(aside, ignore_errors=True)
    else:
        aside.unlink()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write the file `path` whole or not at all (a temporary file beside it, then one rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def private_cache_dir(*parts: str) -> Path:
    """The directory `parts` under the package's cache (`$LONGLLAMA_CACHE`, else `$XDG_CACHE_HOME/longllama` or
    `~/.cache/longllama`), created owner-only (0700).

    The cache root and every directory below it must be real directories owned by this user and writable by nobody
    else (checked with `lstat`, so a planted symlink is refused): otherwise a `PermissionError` says what to fix."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "longllama"
    directory = Path(os.environ.get("LONGLLAMA_CACHE") or default)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_private(directory)
    for part in parts:
        directory = directory / part
        directory.mkdir(mode=0o700, exist_ok=True)
        _check_private(directory)
    return directory


def _check_private(directory: Path) -> None:
    info = os.lstat(directory)
    if not stat.S_ISDIR(info.st_mode):
        raise PermissionError(f"{directory} is not a directory (a symlink?): remove it, or set LONGLLAMA_CACHE to a "
                              "private directory.")
    if hasattr(os, "getuid") and (info.st_uid != os.getuid() or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        raise PermissionError(f"{directory} is owned by another user or writable by others: remove it, or set "
                              "LONGLLAMA_CACHE to a private directory.")


__all__ = ["atomic_directory", "atomic_write_text", "private_cache_dir", "replace_directory"]
