"""longllama/files.py: directories replaced in one rename, partial directories of killed writers removed, live ones
kept, regular files read with a size cap."""

import os
import subprocess
import sys
import textwrap

import pytest

from longllama import files


def make(directory, **contents):
    directory.mkdir()
    for name, text in contents.items():
        (directory / name).write_text(text)
    return directory


def test_replace_directory_swaps_in_one_rename(tmp_path):
    old = make(tmp_path / "out", a="old")
    new = make(tmp_path / ".out.partial-x", b="new")
    files.replace_directory(new, old)
    assert os.listdir(tmp_path) == ["out"] and (old / "b").read_text() == "new"


def test_replace_directory_without_exchange_falls_back(tmp_path, monkeypatch):
    monkeypatch.setattr(files, "exchange", lambda a, b: False)
    old = make(tmp_path / "out", a="old")
    files.replace_directory(make(tmp_path / ".out.partial-x", b="new"), old)
    assert os.listdir(tmp_path) == ["out"] and (old / "b").read_text() == "new"


def test_atomic_directory_failure_leaves_the_old_directory(tmp_path):
    make(tmp_path / "out", a="old")
    with pytest.raises(RuntimeError), files.atomic_directory(tmp_path / "out") as partial:
        (partial / "b").write_text("half")
        raise RuntimeError("killed")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["a"]


def test_stale_partials_are_removed_and_live_ones_kept(tmp_path):
    """A partial directory whose writer died is removed by the next write; one a live process holds locked is not,
    nor are files of similar names that are not ours."""
    stale = make(tmp_path / ".out.partial-dead", x="1")
    live = make(tmp_path / ".out.partial-live", x="2")
    other = make(tmp_path / ".output.partial-abc", x="3")  # another target's
    (tmp_path / ".out.partial-file").write_text("a file, not a directory we made")
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, time
            fcntl.flock(os.open({str(live)!r}, os.O_RDONLY), fcntl.LOCK_EX)  # what lock_directory does
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with files.atomic_directory(tmp_path / "out") as partial:
            (partial / "y").write_text("new")
        assert not stale.exists() and live.exists() and other.exists() and (tmp_path / ".out.partial-file").exists()
    finally:
        holder.kill()
        holder.wait()
    files.remove_stale_partials(tmp_path / "out")  # its holder is dead now
    assert not live.exists()


def test_a_directory_set_aside_by_a_killed_replace_is_put_back(tmp_path):
    """The fallback replace renames the old directory aside first; if the writer dies before the new one is in
    place, the next write restores it before anything else."""
    make(tmp_path / ".out.old-1234", a="old")
    files.remove_stale_partials(tmp_path / "out")
    assert (tmp_path / "out" / "a").read_text() == "old"


@pytest.mark.parametrize("kind", ["device", "fifo", "large"])
def test_read_regular_file_refuses_what_is_not_a_small_file(tmp_path, kind):
    path = tmp_path / "f"
    if kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        path.write_bytes(b"x" * 101)
    with pytest.raises(ValueError, match="not a regular file|more than the 100"):
        files.read_regular_file(path, 100)
    if kind == "large":
        assert files.read_regular_file(path, 101) == b"x" * 101
