"""Our temporary names: bounded for any legal file name, and cleanup that removes exactly our own
names of processes that are gone, only in the folder written, never a user's file."""

import os
import socket
import subprocess
import sys

import pytest

from dit360.load.files import atomic_path, clean_temps, own_temp


@pytest.mark.parametrize("name", ["a" * 255, "é" * 127 + "x", "b" * 150 + ".png", "ü" * 75])
def test_any_legal_name_is_written_atomically(tmp_path, name):
    """A file name of up to 255 bytes (multi-byte too) is written through its temporary name."""
    with atomic_path(tmp_path / name) as tmp:
        assert len(os.fsencode(tmp.name)) <= 255
        tmp.write_text("done")
    assert (tmp_path / name).read_text() == "done" and os.listdir(tmp_path) == [name]


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    return int(proc.stdout)


def test_only_our_temporaries_of_gone_processes_are_removed(tmp_path):
    """A user's `.thesis.tex.tmp`, look-alikes and ours of live processes (this one, pid 1) or of
    another machine stay; ours of a process that has ended go; nothing below the folder is
    looked at."""
    host, gone = socket.gethostname(), dead_pid()
    stays = [".thesis.tex.tmp", ".thesis.tex.tmp.bak", f".thesis.tex.tmp{gone}", f".x.tmp1.{host}"]
    stays += [f".x.tmp{os.getpid()}.{host}", f".x.tmp{gone}.elsewhere", f"x.tmp{gone}.{host}"]
    stays += [f"sub/.x.tmp{gone}.{host}", f".x.tmp0{gone}.{host}", f".x.tmp{gone}.{host}.old"]
    goes = [f".x.tmp{gone}.{host}", f".thesis.tex.tmp{gone}.{host}"]
    for name in stays + goes:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    own_temp(tmp_path / "thesis.tex")  # only this name's
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == sorted(
        [*(n for n in stays if "/" not in n), f".x.tmp{gone}.{host}"]
    )
    clean_temps(tmp_path)  # all our names here
    assert all((tmp_path / n).exists() for n in stays) and not any(
        (tmp_path / n).exists() for n in goes
    )


def write_folder(out, text: str) -> None:
    """A folder output `out` holding a.json = `text`, through atomic_path."""
    with atomic_path(out, r"a\.json") as tmp:
        tmp.mkdir()
        (tmp / "a.json").write_text(text)


def test_a_folder_output_keeps_a_live_process_temporary(tmp_path):
    """A previous folder output is replaced whole only if all it holds is ours: files named as it
    holds them, and temporaries of processes now gone. A live one's (pid 1) refuses it, kept."""
    out, host = tmp_path / "lora", socket.gethostname()
    write_folder(out, "old")
    live = out / f".a.json.tmp1.{host}"
    live.write_text("being written")
    with pytest.raises(FileExistsError, match="holds only an output"):
        write_folder(out, "new")
    assert live.read_text() == "being written" and (out / "a.json").read_text() == "old"
    live.rename(out / f".a.json.tmp99999999.{host}")  # a pid that cannot exist: left by the dead
    write_folder(out, "new")
    assert [p.name for p in out.iterdir()] == ["a.json"] and (out / "a.json").read_text() == "new"
