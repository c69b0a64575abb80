"""How the package writes files: whole or not at all, and into caches no other user can write.

Every writer of the package (converter, sessions, training checkpoints, the demo checkpoint, benchmark results)
goes through these helpers, so that an interrupted write never leaves a half-written result where the user expects
one, and nothing is loaded from a directory another local user could have planted.

A directory is written beside its target (`.NAME.partial-XXXX`, locked with `flock` while it is written) and then
takes the target's place in one rename: `renameat2(RENAME_EXCHANGE)` swaps it with an existing target on Linux, so the
path always holds either the old or the new directory. A writer killed half way (kill -9, power loss) leaves its
partial directory unlocked; the next write to the same target removes it (docs/reliability.md).
"""

import ctypes
import errno
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no advisory locks; stale partial directories are then left for the user to remove
    fcntl = None

RENAME_EXCHANGE = 2  # linux/fs.h: swap two paths atomically


@contextmanager
def atomic_directory(path: str | os.PathLike, mode: int = 0o700) -> Iterator[Path]:
    """Write the directory `path` whole or not at all.

    Yields a new empty directory beside `path` (permissions `mode`). When the block ends without an exception the new
    directory takes the place of `path` (`replace_directory`); on any exception, Ctrl-C included, it is removed and
    `path` is left as it was. Partial directories that killed writers left beside `path` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(path)
    partial = Path(tempfile.mkdtemp(prefix=partial_prefix(path), dir=path.parent))
    lock = lock_directory(partial)  # tells a later writer that this partial directory is alive
    try:
        partial.chmod(mode)
        yield partial
        replace_directory(partial, path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    finally:
        unlock(lock)


def partial_prefix(path: Path) -> str:
    return f".{path.name}.partial-"


def lock_directory(directory: str | os.PathLike, wait: bool = True) -> int | None:
    """An open descriptor of `directory` holding an exclusive `flock` on it (released by `unlock`, or when the
    process dies; None where there are no locks). With `wait=False`, raises `BlockingIOError` if another process
    holds it."""
    if fcntl is None:
        if not wait:
            raise BlockingIOError("no advisory locks on this system: a partial directory may be alive")
        return None
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BaseException:
        os.close(fd)
        raise
    return fd


def unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)


def remove_stale_partials(path: str | os.PathLike) -> list[Path]:
    """Remove the partial directories of `path` that no live writer holds: what a killed write left. A directory
    that `replace_directory` set aside and a killed writer never deleted is put back if `path` is missing, else
    removed. Returns what was removed."""
    path = Path(path)
    removed = []
    for candidate in sorted(path.parent.glob(f".{glob_escape(path.name)}.*-*")):
        if not candidate.name.startswith((partial_prefix(path), aside_prefix(path))):
            continue
        try:
            fd = lock_directory(candidate, wait=False)
        except OSError:  # alive (BlockingIOError), or not a directory we made (a symlink, a file): left alone
            continue
        try:
            if candidate.name.startswith(aside_prefix(path)) and not os.path.lexists(path):
                os.rename(candidate, path)
                continue
            shutil.rmtree(candidate, ignore_errors=True)
            removed.append(candidate)
        finally:
            unlock(fd)
    return removed


def aside_prefix(path: Path) -> str:
    return f".{path.name}.old-"


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def replace_directory(new: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the finished directory `new` to `path` in one rename. An existing `path` is swapped with `new` atomically
    (`renameat2(RENAME_EXCHANGE)`) and then deleted; where the kernel or file system cannot swap, it is renamed aside
    first and put back if the move fails."""
    new, path = Path(new), Path(path)
    if not path.exists() and not path.is_symlink():
        os.rename(new, path)
        return
    if exchange(new, path):
        _remove(new)  # `new` now names the old directory
        return
    aside = path.with_name(f"{aside_prefix(path)}{os.urandom(4).hex()}")
    held = lock_directory(path) if path.is_dir() and not path.is_symlink() else None  # the lock moves with it
    try:
        os.rename(path, aside)
        try:
            os.rename(new, path)
        except BaseException:
            os.rename(aside, path)
            raise
    finally:
        unlock(held)
    _remove(aside)


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths `a` and `b` atomically; False where the system cannot (not Linux, old kernel, file system)."""
    renameat2 = getattr(_libc(), "renameat2", None)
    if renameat2 is None:
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_cwd = -100  # AT_FDCWD
    if renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0:
        return True
    error = ctypes.get_errno()
    if error in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(error, os.strerror(error), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write the file `path` whole or not at all (a temporary file beside it, flushed to disk, then one rename)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """`atomic_write_text` for bytes."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the rename must not reach the disk before the data
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, whose I/O errors (a full disk, a read-only directory) are raised as `OSError`
    like every other write's, not as `SafetensorError`."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        save_file(tensors, path, metadata=metadata)
    except SafetensorError as error:
        raise OSError(f"cannot write {path}: {error}") from error


def read_regular_file(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes (a FIFO, a device such as /dev/zero
    or an oversized file raises `ValueError` instead of blocking or filling memory)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # opening a FIFO must not wait for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ValueError(f"{path} is not a regular file.")
        if info.st_size > limit:
            raise ValueError(f"{path} is {info.st_size} bytes, more than the {limit} expected.")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(limit + 1)
        if len(data) > limit:
            raise ValueError(f"{path} is more than the {limit} bytes expected.")
        return data
    finally:
        os.close(fd)


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


__all__ = [
    "atomic_directory",
    "atomic_write_bytes",
    "atomic_write_text",
    "lock_directory",
    "private_cache_dir",
    "read_regular_file",
    "remove_stale_partials",
    "replace_directory",
    "save_safetensors",
    "unlock",
]
