"""Signals, with real processes: every command says one line and exits 130 on SIGINT (Ctrl-C) and
143 on SIGTERM, from its first second (while torch imports) to its last (a signal whose exception
Python swallows in a finaliser still ends the command so); train.py shuts its data loader down in
its own code, not in a finaliser after main returns, where Ctrl-C would be lost."""

import os
import signal
import subprocess
import sys
import time
import traceback

import pytest
import test_train
from test_train import ROOT, args

import train

SCRIPTS = ("sample.py", "edit.py", "train.py", "convert_weights.py", "prepare.py")
SAID = {signal.SIGINT: (130, "error: interrupted\n"), signal.SIGTERM: (143, "error: terminated\n")}
data, one_thread = test_train.data, test_train.one_thread


def stop_while_importing(name: str, signum: int) -> subprocess.CompletedProcess:
    """Start `python NAME --help` and send `signum` once its first line ran but torch is still
    importing (the script's handlers are set: the test below waits for the module's import)."""
    code = (  # the script as its __main__, reporting when its handlers are in place
        "import runpy, sys, dit360.app.cli as c\n"
        "real = c.handle_signals\n"
        "def ready():\n"
        "    real(); print('ready', flush=True)\n"
        "c.handle_signals = ready\n"
        f"sys.argv = [{name!r}, '--help']\n"
        f"runpy.run_path({name!r}, run_name='__main__')\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_signal_while_importing(name, signum):
    """A signal while the heavy imports run: one line and 130 / 143, no traceback (it was a
    30-line KeyboardInterrupt traceback, and SIGTERM said nothing)."""
    r = stop_while_importing(name, signum)
    code, line = SAID[signum]
    assert (r.returncode, r.stderr) == (code, line), (r.returncode, r.stderr[-2000:])


def run_main_with(body: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """`dit360.app.cli.run_main` of a main whose body is `body` (`os`, `signal` imported), in a
    fresh process with the handlers a script installs."""
    code = (
        "import os, signal\n"
        "from dit360.app.cli import handle_signals, run_main\n"
        "handle_signals()\n"
        "def main():\n"
        + "".join(f"    {line}\n" for line in body.splitlines())
        + "run_main(main)\n"
    )
    env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_in_main_after_cleanup(signum, tmp_path):
    """A signal while main works: its `finally` runs first (a temporary file removed), then the
    one line and 130 / 143."""
    tmp = tmp_path / ".x.tmp"
    body = (
        f"open({str(tmp)!r}, 'w').close()\n"
        "try:\n"
        f"    os.kill(os.getpid(), {int(signum)})\n"
        "    while True: pass\n"
        "finally:\n"
        f"    os.remove({str(tmp)!r}); print('cleaned', flush=True)\n"
    )
    r = run_main_with(body)
    code, line = SAID[signum]
    assert (r.returncode, r.stderr, r.stdout) == (code, line, "cleaned\n"), r.stderr
    assert not tmp.exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_swallowed_by_a_finaliser_still_ends_the_command(signum):
    """A signal whose exception is raised inside a `__del__` (Python prints `Exception ignored`
    and goes on; a DataLoader's worker shutdown runs there) still ends the command with its line
    and code once main returns, not with exit 0."""
    body = (
        "class Slow:\n"
        "    def __del__(self):\n"
        f"        os.kill(os.getpid(), {int(signum)})\n"
        "        for _ in range(10**6): pass\n"
        "x = Slow()\n"
        "del x\n"
        "print('went on', flush=True)\n"
    )
    r = run_main_with(body)
    code, line = SAID[signum]
    assert r.returncode == code and r.stderr.endswith(line), (r.returncode, r.stderr)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_swallowed_while_importing_still_ends_the_command(signum):
    """A signal while importing whose SystemExit a library swallowed (seen once in a full run: the
    line said, then --help ran and exit 0): run_main ends the command, main never runs."""
    code = (
        "import os, signal\n"
        "from dit360.app.cli import handle_signals, run_main\n"
        "handle_signals()\n"
        "try:  # an import that swallows what its code raises\n"
        f"    os.kill(os.getpid(), {int(signum)})\n"
        "    for _ in range(10**6): pass\n"
        "except BaseException:\n"
        "    pass\n"
        "run_main(lambda: print('ran', flush=True))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert (r.returncode, r.stderr, r.stdout) == (*SAID[signum], "")


def test_other_ranks_stop_silently():
    """Under torchrun a rank other than 0 exits 130 without a line (rank 0 says it)."""
    r = run_main_with("os.kill(os.getpid(), signal.SIGINT)\nwhile True: pass", {"RANK": "1"})
    assert (r.returncode, r.stderr) == (130, "")


def test_train_closes_its_loader_in_main(tiny_flux, data, tmp_path, monkeypatch):
    """train.py with loader processes shuts them down in main, not in the loader's `__del__` as
    main's frame is torn down: a Ctrl-C there (about 2 s after the last checkpoint, while the
    workers are joined) was swallowed and the run ended with exit 0."""
    import torch.utils.data.dataloader as dl

    stacks = []
    real = dl._MultiProcessingDataLoaderIter._shutdown_workers

    def spy(self):
        if not self._shutdown:  # a call that stops processes (later calls return at once)
            stacks.append([f.name for f in traceback.extract_stack()])
        return real(self)

    monkeypatch.setattr(dl._MultiProcessingDataLoaderIter, "_shutdown_workers", spy)
    argv = args(tiny_flux, data, tmp_path / "out", "--max-steps", "1", "--grad-accum", "1")
    train.main([*argv, "--workers", "1"])
    time.sleep(0)  # main has returned: its frame and the loader generator are gone
    assert stacks, "the loader had no worker process to shut down"
    assert not [s for s in stacks if "__del__" in s], "a loader's workers were shut down in __del__"
