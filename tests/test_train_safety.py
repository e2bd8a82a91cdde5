"""train.py's safety on the tiny FLUX.1-dev folder: bad arguments are one line and leave nothing,
a run's folder is its own (relaunch refused, lock), a SIGKILLed run resumes bit-identically,
non-finite steps are skipped and never saved, checkpoints hold no pickle and a torn one is
skipped."""

import fcntl
import math
import os
import pickle
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import test_train
import torch
from clitest import expect_error
from safetensors.torch import load_file
from test_train import ROOT, RUN, args, assert_same_lora, log, lora_file

import train
from dit360.train.checkpoints import MARKER, STATE

# The fixtures of test_train, module-scoped here too: the tiny data and an uninterrupted run.
data, trained, one_thread = test_train.data, test_train.trained, test_train.one_thread


def checkpoints(out: Path) -> list[int]:
    return sorted(train.steps(out / "checkpoints"))


def leftovers(out: Path) -> list[str]:
    """Temporary files and the lock: what a finished or resumed run must not leave."""
    return [str(p) for p in out.rglob(".*") if ".tmp" in p.name or p.name == ".lock"]


# --- bad arguments: one line, exit 2, no traceback, nothing written -------------------------------


def make_file(path: Path, text: str = "x") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def lock_it(tmp_path: Path) -> None:
    """The lock of a live run (this process: flocked while it lives) on tmp_path/out."""
    make_file(tmp_path / "out" / ".lock", f"{os.getpid()} {socket.gethostname()}")
    fcntl.flock(os.open(tmp_path / "out" / ".lock", os.O_RDONLY), fcntl.LOCK_EX)


BAD = {  # case: (extra arguments, what the error says, what to set up in tmp_path)
    "save-every 0": (["--save-every", "0"], r"--save-every: needs a whole number >= 1", None),
    "grad-accum 0": (["--grad-accum", "0"], r"--grad-accum: needs a whole number >= 1", None),
    "batch-size 0": (["--batch-size", "0"], r"--batch-size: needs a whole number >= 1", None),
    "lora-rank 0": (["--lora-rank", "0"], r"--lora-rank: needs a whole number >= 1", None),
    "max-steps 0": (["--max-steps", "0"], r"--max-steps: needs a whole number >= 1", None),
    "epochs -1": (["--epochs", "-1"], r"--epochs: needs a whole number >= 1", None),
    "keep -1": (["--keep", "-1"], r"--keep: needs a whole number >= 0", None),
    "workers 1.5": (["--workers", "1.5"], r"--workers: needs a whole number >= 0", None),
    "lr nan": (["--lr", "nan"], r"--lr: needs a finite number > 0, got 'nan'", None),
    "lr inf": (["--lr", "inf"], r"--lr: needs a finite number > 0", None),
    "lr 0": (["--lr", "0"], r"--lr: needs a finite number > 0", None),
    "alpha -8": (["--alpha", "-8"], r"--alpha: needs a finite number > 0", None),
    "dropout 2": (["--dropout", "2"], r"--dropout: needs a finite number >= 0 and <= 1", None),
    "warmup nan": (["--warmup", "nan"], r"--warmup: needs a finite number >= 0 and <= 1", None),
    "wrap-pad 3": (["--wrap-pad", "3"], r"--wrap-pad: invalid choice", None),
    "unknown flag": (["--learning-rate", "1"], r"unrecognized arguments: --learning-rate", None),
    "missing pano": (["--pano", "nope.jsonl"], r"--pano nope.jsonl: no such file", None),
    "missing persp": (["--persp", "nope.jsonl"], r"--persp nope.jsonl: no such file", None),
    "empty pano": (
        ["--pano", "e.jsonl"],
        r"--pano \S*e\.jsonl: no rows in it: fill it \(prepare\.py writes one\)$",
        lambda t: make_file(t / "e.jsonl", "\n"),
    ),
    "empty persp": (
        ["--persp", "e.jsonl"],
        r"--persp \S*e\.jsonl: no rows in it: fill it .* or drop --persp$",
        lambda t: make_file(t / "e.jsonl", ""),
    ),
    "bad device": (["--device", "mps"], r"--device mps: train.py runs on cpu or cuda", None),
    "no such gpu": (["--device", "cuda:99"], r"--device cuda:99: \d+ CUDA devices here", None),
    "not a device": (["--device", "banana"], r"--device banana: not a device", None),
    "bad targets": (
        ["--targets", "attn.to_z"],
        r"no layer matches the LoRA targets attn.to_z .*choose among .*attn.to_q",
        None,
    ),
    "resume and overwrite": (["--resume", "--overwrite"], r"--resume .* --overwrite", None),
    "out is a file": ([], r"--out .*out: .*out is not a folder", lambda t: make_file(t / "out")),
    "out in a file": (["--out", "f/out"], r"f is not a folder", lambda t: make_file(t / "f")),
    "out holds a run": (
        [],
        r"--out .*out holds a run \(log.jsonl\): continue it with --resume, delete it with "
        r"--overwrite, or choose another --out",
        lambda t: [make_file(t / "out" / n) for n in (MARKER, "log.jsonl")],
    ),
    "overwrite a folder that is no run": (
        ["--overwrite"],
        r"--out .*out holds files that no training run wrote \(.thesis.tex.tmp, lora, samples\)",
        lambda t: [make_file(t / "out" / n) for n in (".thesis.tex.tmp", "lora/a", "samples/b")],
    ),
    "resume a folder that is no run": (
        ["--resume"],
        r"--out .*out holds files that no training run wrote \(checkpoints\): choose a new",
        lambda t: make_file(t / "out" / "checkpoints" / "step-00000002" / STATE),
    ),
    "empty lock": (
        ["--resume"],
        r"--out .*out: its lock .*\.lock names no run \(''.*delete it if no run is using --out",
        lambda t: make_file(t / "out" / ".lock", ""),
    ),
    "out in use": (["--resume"], rf"--out .*out is in use by process {os.getpid()}", lock_it),
    "base-dtype fp16": (["--base-dtype", "fp16"], r"--base-dtype: invalid choice", None),
    "offload model": (["--offload", "model"], r"--offload: invalid choice", None),
    "streaming without recompute": (
        ["--offload", "blocks", "--no-recompute"],
        r"--offload blocks streams each block again for backward's recomputation: drop "
        r"--no-recompute",
        None,
    ),
    "previews without prompts": (
        ["--sample-every", "2"],
        r"previews need both --sample-every N and --sample-prompts FILE",
        None,
    ),
    "missing prompts": (
        ["--sample-every", "2", "--sample-prompts", "nope.txt"],
        r"--sample-prompts nope.txt: no such file",
        None,
    ),
    "empty prompts": (
        ["--sample-every", "2", "--sample-prompts", "p.txt"],
        r"--sample-prompts p.txt: no sample-prompts in it",
        lambda t: make_file(t / "p.txt", "\n  \n"),
    ),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_arguments(case, tiny_flux, data, tmp_path, capsys, monkeypatch):
    """Each bad input: one line `error: ...` naming the flag and the fix, exit 2, no file."""
    extra, match, setup = BAD[case]
    monkeypatch.chdir(tmp_path)  # relative paths in the table
    if setup:
        setup(tmp_path)
    argv = args(tiny_flux, data, tmp_path / "out", *RUN, *extra)
    expect_error(capsys, train.main, argv, tmp_path, match)


def test_resume_with_other_settings_lists_every_difference(tiny_flux, data, trained, capsys):
    """Another rank, alpha, resolution and seed: one error listing all four; the run untouched."""
    other = ("--lora-rank", "8", "--alpha", "2", "--resolution", "48", "--seed", "4", "--resume")
    argv = args(tiny_flux, data, trained, *RUN, *other)
    expect_error(
        capsys, train.main, argv, trained,
        r"step-00000006 was trained with other settings: --lora-rank 4 \(now 8\); "
        r"--alpha 8.0 \(now 2.0\); --height 32 \(now 48\); --seed 3 \(now 4\)",
    )  # fmt: skip


def test_relaunch_is_refused_and_overwrite_starts_again(tiny_flux, data, trained, tmp_path, capsys):
    """Without --resume a finished run is left as it was; --overwrite deletes it first."""
    expect_error(capsys, train.main, args(tiny_flux, data, trained, *RUN), trained, "holds a run")
    out = tmp_path / "again"
    shutil.copytree(trained, out)
    (out / "notes.txt").write_text("mine")  # not the run's: --overwrite leaves it
    train.main(args(tiny_flux, data, out, *RUN, "--max-steps", "2", "--overwrite"))
    assert checkpoints(out) == [2] and [r["step"] for r in log(out)] == [1, 2]
    assert (out / "notes.txt").read_text() == "mine" and not leftovers(out)


# --- a real kill ----------------------------------------------------------------------------------


def test_sigkill_then_resume_is_bit_identical(tiny_flux, data, trained, tmp_path, capsys):
    """`python train.py` SIGKILLed once its first checkpoint is written; --resume takes its stale
    lock over and ends with the LoRA and losses of the uninterrupted run, leaving no temp file."""
    out = tmp_path / "killed"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as the in-process run: the same sums
    cmd = [sys.executable, "train.py", *args(tiny_flux, data, out, *RUN)]
    with open(tmp_path / "stderr.txt", "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
        try:
            deadline = time.monotonic() + 240
            while not (out / "checkpoints" / "step-00000002").exists():
                assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
                assert time.monotonic() < deadline, "no checkpoint within 240 s"
                time.sleep(0.02)
        finally:
            proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    assert (out / ".lock").read_text().startswith(f"{proc.pid} ")  # a dead process's lock
    done = checkpoints(out)
    assert done and done[-1] < 6, done  # killed mid-run
    train.main(args(tiny_flux, data, out, *RUN, "--resume"))
    assert f"process {proc.pid}, which held" in capsys.readouterr().err
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(trained)]
    assert_same_lora(out, trained)
    assert not leftovers(out)


# --- non-finite steps -----------------------------------------------------------------------------


def test_one_nonfinite_step_is_skipped(tiny_flux, data, tmp_path, monkeypatch):
    """A NaN loss at step 2 only: no update there (step 1's LoRA and AdamW state stay), a
    `skipped` log line, and the run goes on to a finite LoRA."""
    real, calls = train.flow_loss, [0]

    def flow_loss(*a, **kw):
        calls[0] += 1
        loss, n, parts = real(*a, **kw)
        return (loss * math.nan if calls[0] in (3, 4) else loss), n, parts  # step 2's two

    monkeypatch.setattr(train, "flow_loss", flow_loss)
    out = tmp_path / "skip"
    train.main(args(tiny_flux, data, out, *RUN, "--max-steps", "3", "--save-every", "1"))
    assert [r.get("skipped") for r in log(out)] == [None, "non-finite loss and gradient norm", None]
    one, two, three = (load_file(out / "checkpoints" / f"step-{s:08d}" / STATE) for s in (1, 2, 3))
    assert all(torch.equal(one[k], two[k]) for k in one)  # step 2 changed nothing
    assert not all(torch.equal(two[k], three[k]) for k in two)  # step 3 did
    assert all(v.isfinite().all() for v in lora_file(out).values())


def poison_at(call: int) -> Callable:
    """flow_loss that fills the LoRA with NaN at its `call`-th call (every loss after is NaN)."""
    real, calls = train.flow_loss, [0]

    def flow_loss(model, *a, **kw):
        calls[0] += 1
        if calls[0] == call:
            with torch.no_grad():
                for p in model.parameters():
                    if p.requires_grad:
                        p.to_local().fill_(math.nan)  # this rank's shard
        return real(model, *a, **kw)

    return flow_loss


@pytest.mark.parametrize(
    ("steps", "match"),
    [
        ("8", r"step 5: loss or gradient norm not finite 3 steps in a row; the last checkpoint "
              r"is .*step-00000002: --resume with a lower --lr"),
        ("3", r"the LoRA holds non-finite values .*: not exported"),
    ],
    ids=["diverges", "at the end"],
)  # fmt: skip
def test_nonfinite_state_is_never_saved(
    steps, match, tiny_flux, data, tmp_path, monkeypatch, capsys
):
    """The LoRA turns NaN at step 3: steps 3- are skipped and logged, the step-4 checkpoint is
    not written, so --keep 1 keeps the finite step 2; exit 1 after --max-nonfinite steps or at
    the end, and no NaN LoRA exported."""
    monkeypatch.setattr(train, "flow_loss", poison_at(5))  # step 3, micro-batch 1
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as exit_info:
        train.main(args(tiny_flux, data, out, *RUN, "--max-steps", steps, "--keep", "1"))
    err = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert exit_info.value.code == 1
    assert re.search(match, err[-1]) and err[-1].startswith("error: "), err[-1]
    assert [r.get("skipped") is not None for r in log(out)][2:] == [True] * (len(log(out)) - 2)
    assert checkpoints(out) == [2]
    state = load_file(out / "checkpoints" / "step-00000002" / STATE)
    assert all(v.isfinite().all() for v in state.values())
    assert not (out / "lora").exists() and not leftovers(out)


# --- checkpoints: no pickle; a torn one is skipped ------------------------------------------------


class Payload:
    """Unpickling it creates a marker file: proof that a loader ran code from the file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickle_checkpoint_runs_nothing(tiny_flux, data, trained, tmp_path, capsys):
    """A newer checkpoint made of pickles (DCP's .metadata, a .distcp: refused up front, as any
    file a checkpoint does not hold; a fake state file) is skipped with a warning and never
    unpickled; the resume uses the latest real one."""
    out, marker = tmp_path / "run", tmp_path / "pwned"
    shutil.copytree(trained, out)
    payload = pickle.dumps(Payload(marker))
    pickle.loads(payload)  # the payload is live: unpickling it makes the marker
    assert marker.exists()
    marker.unlink()
    crafted = out / "checkpoints" / "step-00000009"
    crafted.mkdir()
    for name in (".metadata", "__0_0.distcp", STATE):
        (crafted / name).write_bytes(payload)
    argv = args(tiny_flux, data, out, *RUN, "--resume")
    expect_error(capsys, train.main, argv, out, r"step-00000009/\S+ is not what a run writes")
    for name in (".metadata", "__0_0.distcp"):  # not of a checkpoint's layout: refused, now gone
        (crafted / name).unlink()
    train.main(argv)
    assert "warning: skipping checkpoint" in capsys.readouterr().err
    expect_error(
        capsys, train.main, args(tiny_flux, data, out, *RUN, "--resume", str(crafted)), out,
        r"--resume .*step-00000009: not a readable checkpoint",
    )  # fmt: skip
    assert not marker.exists()
    assert_same_lora(out, trained)


def test_torn_checkpoint_and_partial_log_line(tiny_flux, data, trained, tmp_path, capsys):
    """The latest checkpoint cut in half and a half-written last log line: both dropped with a
    warning, the resume falls back to step 4 and ends bit-identical to the uninterrupted run."""
    out = tmp_path / "torn"
    shutil.copytree(trained, out)
    state = out / "checkpoints" / "step-00000006" / STATE
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 7, "epoch": 3, "lo')
    with pytest.warns(UserWarning, match="log.jsonl:7: dropped an unreadable line"):
        train.main(args(tiny_flux, data, out, *RUN, "--resume"))
    assert "warning: skipping checkpoint" in capsys.readouterr().err
    assert [(r["step"], r["loss"]) for r in log(out)] == [
        (r["step"], r["loss"]) for r in log(trained)
    ]
    assert_same_lora(out, trained)
    assert checkpoints(out) == [2, 4, 6] and not leftovers(out)


# --- ownership: the lock decides; only our own files are removed; a full disk -------------------

# train.py, stopped (SIGSTOP to itself) when it starts reading the rows: in its check window.
STOP_IN_CHECKS = """
import os, signal, train
real = train.read_rows
def read_rows(*a, **kw):
    os.kill(os.getpid(), signal.SIGSTOP)
    return real(*a, **kw)
train.read_rows = read_rows
train.run_main(train.main)
"""


def stopped(pid: int) -> bool:
    """Whether process `pid` is stopped (state T in /proc)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


def test_a_run_started_during_anothers_checks_is_refused(
    tiny_flux, data, trained, tmp_path, capsys
):
    """Run A, a real process, is stopped in its check window; run B on the same --out meanwhile
    is refused with one line and changes nothing; A, continued, ends as the uninterrupted run."""
    out, err = tmp_path / "race", tmp_path / "stderr.txt"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as the in-process run: the same sums
    cmd = [sys.executable, "-c", STOP_IN_CHECKS, *args(tiny_flux, data, out, *RUN)]
    with open(err, "w") as stderr:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        deadline = time.monotonic() + 120
        while not stopped(proc.pid):
            assert proc.poll() is None, err.read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached its checks"
            time.sleep(0.02)
        out.mkdir(exist_ok=True)  # B's folder snapshot (A may not have made it)
        expect_error(
            capsys, train.main, args(tiny_flux, data, out, *RUN), out,
            rf"--out .*race is in use by process {proc.pid} on ",
        )  # fmt: skip
    finally:
        proc.send_signal(signal.SIGCONT)
        rc = proc.wait(timeout=300)
    assert rc == 0, err.read_text()[-3000:]
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(trained)]
    assert_same_lora(out, trained)
    assert checkpoints(out) == [2, 4, 6] and not leftovers(out)


USERS = [".thesis.tex.tmp", "checkpoints/.thesis.tex.tmp", "notes/.b.tmp7"]  # in lora/: refused
USERS += ["samples/step-00000002/.c.png.tmp", "checkpoints/.x.tmp1." + socket.gethostname()]


@pytest.mark.parametrize("mode", ["--resume", "--overwrite"])
def test_resume_and_overwrite_remove_only_ours(mode, tiny_flux, data, trained, tmp_path):
    """A user's hidden `.NAME.tmp` files anywhere below a run's --out (and one of our pattern
    whose process, pid 1, is alive) survive --resume and --overwrite; ours of a dead process
    (a pid that cannot exist) go."""
    out, host = tmp_path / "run", socket.gethostname()
    shutil.copytree(trained, out)
    for name in USERS:
        make_file(out / name, "mine")
    ours = [out / f".args.json.tmp99999999.{host}", out / "checkpoints" / f".s.tmp99999999.{host}"]
    for path in ours:
        make_file(path, "left by a killed run")
    steps = "6" if mode == "--resume" else "2"  # a resume past --max-steps is refused
    train.main(args(tiny_flux, data, out, *RUN, "--max-steps", steps, mode))
    assert all((out / name).read_text() == "mine" for name in USERS)
    assert not any(p.exists() for p in ours)


def test_a_full_disk_is_one_line(tiny_flux, data, trained, tmp_path):
    """`python train.py` whose files may not grow past half a checkpoint's state (as a full
    disk): its first checkpoint fails with one line, exit 1, no checkpoint nor temporary left."""
    import resource

    limit = (trained / "checkpoints" / "step-00000002" / STATE).stat().st_size // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit: EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "full"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    cmd = [sys.executable, "train.py", *args(tiny_flux, data, out, *RUN)]
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, preexec_fn=small_files, timeout=300
    )
    err = proc.stderr.replace("\r", "\n").strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert sum(e.startswith("error: ") for e in err) == 1, proc.stderr[-3000:]
    assert re.fullmatch(r"error: the run in \S*full stopped: .*File too large.*", err[-1]), err[-1]
    assert checkpoints(out) == [] and not leftovers(out)


def test_a_run_failing_before_its_first_step_does_not_block_the_next(
    tiny_flux, data, tmp_path, monkeypatch
):
    """A run that passed its checks but failed at its first step (out of memory) leaves --out
    marked, with no step logged: the next run there starts without --overwrite."""
    out = tmp_path / "oom"

    def no_memory(*a, **kw):
        raise torch.OutOfMemoryError("out of memory")

    with monkeypatch.context() as m:
        m.setattr(train, "flow_loss", no_memory)
        with pytest.raises(torch.OutOfMemoryError):
            train.main(args(tiny_flux, data, out, *RUN, "--max-steps", "2"))
    train.main(args(tiny_flux, data, out, *RUN, "--max-steps", "2"))
    assert checkpoints(out) == [2] and [r["step"] for r in log(out)] == [1, 2]


def test_two_runs_taking_over_one_dead_lock(tmp_path, capsys):
    """A dead run's lock is taken over; while another run holds it (flocked: here an open file of
    this process), the next one stops, naming it, the lock left as it was; once it is released
    (closed: the process ended, however), it is taken over again."""
    from dit360.train import checkpoints

    host = socket.gethostname()
    lock, gone = tmp_path / ".lock", f"999999999 {host}"
    lock.write_text(gone)
    assert checkpoints.take_lock(tmp_path) == lock and lock.read_text() == f"{os.getpid()} {host}"
    assert "process 999999999, which held" in capsys.readouterr().err
    checkpoints.release(lock, made=False)
    assert not lock.exists()
    lock.write_text(f"{os.getppid()} {host}")
    fcntl.flock(holder := os.open(lock, os.O_RDONLY), fcntl.LOCK_EX)  # another live run
    with pytest.raises(SystemExit):
        checkpoints.take_lock(tmp_path)
    assert f"in use by process {os.getppid()}" in capsys.readouterr().err
    assert lock.read_text() == f"{os.getppid()} {host}" and [*tmp_path.iterdir()] == [lock]
    os.close(holder)  # it ended
    assert checkpoints.take_lock(tmp_path) == lock and lock.read_text() == f"{os.getpid()} {host}"
    checkpoints.release(lock, made=False)
