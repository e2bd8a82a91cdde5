"""The process's surroundings (README, What is guaranteed): standard streams that are closed, a pipe
closed early, a full /dev/full, an ASCII stdout; torchrun's variables set by hand; names with a
line break or an undecodable byte; two runs into one --out. Each ends with a whole output or one
line `error: ...` and its status, no traceback, nothing of another run's removed."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import test_train
from clitest import expect_error
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import load_file
from test_fuzz import FUZZ
from test_prepare import make_images
from test_sample_cli import args as sample_args
from test_train import ROOT
from test_train import args as train_args

import convert_weights
import prepare
import sample
from dit360.app import batch, cli
from dit360.app.outputs import evaluate_main, view_main
from dit360.train import distributed

# Buffered stdout (the suite may run with PYTHONUNBUFFERED): the bytes left for Python's last flush.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"OMP_NUM_THREADS": "1"}
data, one_thread = test_train.data, test_train.one_thread  # the tiny training rows
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def command(*argv: str, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    """A real `python ARGV` in the repository (stderr captured unless `kw` says otherwise)."""
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([sys.executable, *argv], cwd=ROOT, env=ENV | (env or {}), text=True,
                          timeout=120, **kw)  # fmt: skip


def panoramas(folder: Path, *names: str) -> Path:
    """2:1 random PNGs named `names` in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    rgb = np.random.default_rng(0).integers(0, 256, (8, 16, 3), dtype=np.uint8)
    for name in names:
        Image.fromarray(rgb).save(folder / name)
    return folder


# --- standard streams ---------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["a pipe closed early", "/dev/full"])
@pytest.mark.parametrize("script", ["convert_weights.py", "dit360.app.evaluate"])
def test_stdout_that_cannot_take_the_output(how, script, tmp_path):
    """`cmd | head -1` whose reader is gone, `cmd > /dev/full`: one line `error: stdout: ...`,
    exit 1 (it was Python's two-line "Exception ignored ... BrokenPipeError" and exit 120, or a
    traceback from `-m dit360.app.evaluate`, which set up no handlers)."""
    argv = [script, "--help"] if script.endswith(".py") else ["-m", script, str(tmp_path)]
    panoramas(tmp_path, *(f"{i}.png" for i in range(3)))
    if how == "/dev/full":
        with open("/dev/full", "w") as full:
            r = command(*argv, stdout=full)
        err, code = r.stderr, r.returncode
    else:
        proc = subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=ENV, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        proc.stdout.close()  # the reader is gone before the first byte
        err, code = proc.stderr.read(), proc.wait(timeout=120)
    said = "Broken pipe" if how.startswith("a pipe") else "No space left on device"
    assert code == 1 and err.startswith("error: stdout: ") and said in err, (code, err)
    assert err.count("\n") == 1, err


@pytest.mark.parametrize(
    "argv", [["sample.py", "--height", "7"], ["-m", "dit360.app.evaluate", "x"]]
)
def test_closed_standard_streams(argv):
    """stdin, stdout and stderr closed (`<&- >&- 2>&-`): bad input still exits 2 (writing the
    line to a missing stderr was an AttributeError, exit 1), and no file we open takes fd 1 or 2,
    where a C library's message would land in it."""
    code = "import os\nfor fd in (0, 1, 2): os.close(fd)\n"
    launcher = f"{code}os.execv({sys.executable!r}, [{sys.executable!r}, *{argv!r}])"
    r = command("-c", launcher, stderr=None)
    assert r.returncode == 2


def test_a_current_folder_that_was_removed(tmp_path):
    """`cd d && rm -rf ../d && python sample.py ...`: one line, exit 2, before torch loads (MKL
    said "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so", exit 2, no `error:` line)."""
    gone = tmp_path / "gone"
    gone.mkdir()
    run = f"os.execv({sys.executable!r}, [{sys.executable!r}, {str(ROOT / 'sample.py')!r}])"
    r = command("-c", f"import os\nos.chdir({str(gone)!r})\nos.rmdir({str(gone)!r})\n{run}")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.startswith("error: the current folder was removed"), r.stderr


@pytest.mark.parametrize("value", ["abc", "0", "", "1.5", "-2"])
def test_a_bad_omp_num_threads(value):
    """OMP_NUM_THREADS that libgomp cannot read: one line naming it, exit 2, before torch loads
    (libgomp said "Invalid value for environment variable" on two lines, and ran on)."""
    r = command("sample.py", "--prompt", "x", env={"OMP_NUM_THREADS": value})
    said = f"error: OMP_NUM_THREADS={value}: not a number of threads: set 1, 2, ..., or unset it\n"
    assert r.returncode == 2 and r.stderr == said, r.stderr


@pytest.mark.parametrize("script", ["sample.py", "edit.py", "train.py", "prepare.py",
                                    "convert_weights.py"])  # fmt: skip
def test_help_whatever_omp_num_threads_holds(script):
    """--help (-h) prints the help, exit 0, with an OMP_NUM_THREADS libgomp cannot read (it was
    refused as a run is) and no line of libgomp's."""
    flag = "-h" if script in ("edit.py", "prepare.py") else "--help"
    r = command(script, flag, env={"OMP_NUM_THREADS": "abc"}, stdout=subprocess.PIPE)
    assert r.returncode == 0 and r.stdout.startswith("usage: ") and r.stderr == "", r.stderr


def test_an_ascii_stdout_escapes_what_it_cannot_encode(tmp_path):
    """PYTHONIOENCODING=ascii (or a C locale's stdout) and a folder named in UTF-8: the line says
    the name escaped, exit 0 (it was a UnicodeEncodeError traceback after the work was done)."""
    folder = panoramas(tmp_path / "für", "a.png")
    r = command("-m", "dit360.app.evaluate", str(folder), env={"PYTHONIOENCODING": "ascii"},
                stdout=subprocess.PIPE)  # fmt: skip
    assert r.returncode == 0 and r.stderr == "", r.stderr
    assert r.stdout.startswith(f"{tmp_path}/f\\xfcr/a.png: seam "), r.stdout


def test_names_with_line_breaks_are_said_on_one_line(tiny_flux, tmp_path, capsys):
    """Files named with a line break or an escape, in a folder so named: `python -m
    dit360.app.evaluate` and `view`, `convert_weights.py --out`, train.py's lines say each on one
    line (a name's line break made two, an escape moved the terminal)."""
    names = ["a\nb.png", "c\r.png", "\x1b[2Jd.png", "e.png"]
    folder = panoramas(tmp_path / "p\nq", *names)
    evaluate_main([str(folder)])
    view_main([str(folder / "e.png"), "--out", str(tmp_path / "v\nw.html")])
    convert_weights.main(["--base", str(tiny_flux), "--out", str(tmp_path / "c\nd.safetensors")])
    distributed.print0("wrote", folder / "lora")
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(names) + 1 + 3 and all("\x1b" not in line for line in lines), lines


@pytest.mark.parametrize("name", ["a\nb.png", "a\rb.png", "\x1b]0;x\x07.png", "\udcff.png"])
def test_an_output_name_that_prints_on_two_lines_is_refused(name, tiny_flux, tmp_path, capsys):
    """`sample.py --out` (and every image output, batch rows too) named with a control character:
    one line, exit 2, nothing written (a line break was written, and said on two lines)."""
    argv = sample_args(tiny_flux, tmp_path / name)
    expect_error(capsys, sample.main, argv, tmp_path, r"is not printable UTF-8 text: choose anoth")


# --- torchrun's variables -----------------------------------------------------------------------

VALUES = st.one_of(st.none(), st.integers(-2, 4).map(str), st.sampled_from(["", "x", "1.5", "٣"]))


@FUZZ
@given(env=st.fixed_dictionaries({k: VALUES for k in TORCHRUN}))
def test_torchrun_variables_set_by_hand(env, monkeypatch):
    """RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT as anything: a batch's share is
    jobs[rank::world] of a consistent set, or one line naming them, exit 2 (RANK=5 WORLD_SIZE=2
    made nothing and said so as a success; WORLD_SIZE=0 was "slice step cannot be zero"; train.py's
    RANK=abc a traceback)."""
    for k, v in env.items():
        monkeypatch.delenv(k, raising=False) if v is None else monkeypatch.setenv(k, v)
    jobs = list(range(10))
    try:
        share, main = batch.share(jobs), distributed.is_main()
    except SystemExit as e:
        assert e.code == 2
        return
    rank, world = int(env["RANK"] or 0), int(env["WORLD_SIZE"] or 1)
    assert 0 <= rank < world and share == jobs[rank::world] and main == (rank == 0), env
    if env["RANK"] is not None:  # all that a process group needs is there
        assert env["MASTER_ADDR"] and 0 < int(env["MASTER_PORT"]) < 65536, env


@pytest.mark.parametrize(
    "env",
    [{"RANK": "5", "WORLD_SIZE": "2"}, {"RANK": "1"}, {"WORLD_SIZE": "0", "RANK": "0"},
     {"RANK": "-1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "1"}],
)  # fmt: skip
def test_torchrun_variables_that_torchrun_never_sets(env, monkeypatch, capsys):
    """A rank outside the world, a rank without one: one line naming the variables, exit 2."""
    for k in TORCHRUN:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        batch.share(list(range(4)))
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    assert (
        err.startswith(f"error: RANK={env['RANK']} WORLD_SIZE=") and "launch with torchrun" in err
    )


def test_a_launcher_without_local_rank(monkeypatch):
    """RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT without LOCAL_RANK (Kubeflow's PyTorchJob, one
    process a machine): LOCAL_RANK 0, the rank's share (was refused as not torchrun's)."""
    for k in TORCHRUN:
        monkeypatch.delenv(k, raising=False)
    env = dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="h", MASTER_PORT="29500")
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert cli.torchrun() == (1, 2, 0) and batch.share(list(range(5))) == [1, 3]


def alone(script: str, argv: list[str], wait: str) -> str:
    """`python SCRIPT ARGV` as rank 0 of a torchrun world of 2 whose other process never comes,
    `wait` (module.NAME, a timedelta) set to 2 s: its one `error:` line, after exit 1 and no
    traceback."""
    with socket.socket() as s:  # a free port
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    module, name = wait.rsplit(".", 1)
    code = (
        f"import datetime, runpy, sys\nimport {module} as m\n"
        f"m.{name} = datetime.timedelta(seconds=2)\nsys.argv = [{script!r}, *{argv!r}]\n"
        f"runpy.run_path({script!r}, run_name='__main__')"
    )
    env = dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    r = command("-c", code, env=env, stdout=subprocess.DEVNULL)
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    said = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(said) == 1, said
    return said[0]


def test_a_training_process_whose_peers_never_come(tiny_flux, data, tmp_path):
    """train.py under torchrun's variables, WORLD_SIZE=2, but no second process: one line, exit
    1, once `distributed.JOIN` is over (it waited 30 minutes, then a traceback); here 2 s."""
    argv = train_args(tiny_flux, data, tmp_path / "run", "--max-steps", "1")
    said = alone("train.py", argv, "dit360.train.distributed.JOIN")
    assert "the other processes did not join (" in said, said


def test_a_batch_process_whose_peers_never_report(tiny_flux, tmp_path):
    """sample.py --prompts under torchrun's variables, WORLD_SIZE=2, no second process: its share
    is written, then one line, exit 1, once `batch.CLOSING` is over (it waited 30 minutes, then a
    traceback); here 2 s."""
    (tmp_path / "p.txt").write_text("a\nb\n")
    argv = [*sample_args(tiny_flux, tmp_path / "x.png")[2:-2], "--prompts", str(tmp_path / "p.txt")]
    argv += ["--out-dir", str(tmp_path / "out")]
    said = alone("sample.py", argv, "dit360.app.batch.CLOSING")
    assert "the other processes did not report within" in said, said
    assert len(list((tmp_path / "out").glob("*.png"))) == 1  # rank 0's share: jobs[0::2]


# --- names and two runs into one --out (prepare.py) ---------------------------------------------


def test_prepare_lists_an_undecodable_name_as_a_bad_row(tmp_path):
    """An input image whose name has a byte that is not UTF-8: a bad row naming it (--skip-bad
    writes the others); it was a UnicodeEncodeError naming nothing, after all the work."""
    make_images(tmp_path / "in", {"a.png": (64, 32), "b.png": (64, 32)})
    odd = os.fsencode(tmp_path / "in") + b"/\xff"
    os.rename(tmp_path / "in" / "b.png", odd + b".png")
    os.rename(tmp_path / "in" / "b.txt", odd + b".txt")
    with pytest.raises(ValueError, match=r"1 bad rows.*\n  \S+/\udcff.png: its name is not UTF-8"):
        prepare.prepare(tmp_path / "out", pano=tmp_path / "in")
    assert not (tmp_path / "out").exists()
    written = prepare.prepare(tmp_path / "out", pano=tmp_path / "in", skip_bad=True)
    assert len(written["pano"].read_text().splitlines()) == 1


def test_a_failed_prepare_keeps_what_another_run_wrote(tmp_path):
    """Two prepare.py runs into one new --out, the other done first: this run's failure (the
    files folder's name taken) removes its own stage only, not the --out it found missing and
    that now holds the other's output (it removed the whole --out)."""
    out = tmp_path / "new" / "data"
    with pytest.raises(ValueError, match="this run's failure"), prepare.staging(out):
        (out / "pano-files-1").mkdir()  # the other run's output, as it writes it
        (out / "pano.jsonl").write_text("{}\n")
        raise ValueError("this run's failure")
    assert sorted(p.name for p in out.iterdir()) == ["pano-files-1", "pano.jsonl"]
    with pytest.raises(ValueError), prepare.staging(tmp_path / "new" / "x" / "y"):
        raise ValueError("a failure alone")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["data"]  # what it made: gone


def test_two_conversions_into_one_out(tiny_flux, tmp_path):
    """Two convert_weights.py at once to one --out: both exit 0, the file whole (it loads, in the
    BFL layout), no temporary file left beside it."""
    out = tmp_path / "flux.safetensors"
    argv = ["convert_weights.py", "--base", str(tiny_flux), "--out", str(out)]
    run = dict(cwd=ROOT, env=ENV, text=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    procs = [subprocess.Popen([sys.executable, *argv], **run) for _ in "ab"]
    for proc in procs:
        err = proc.communicate(timeout=120)[1]
        assert proc.returncode == 0 and err == "", err[-2000:]
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    tensors = load_file(out)  # whole: its header's offsets cover the file exactly
    assert {"double_blocks.1.img_attn.qkv.weight", "final_layer.linear.weight"} <= set(tensors)
