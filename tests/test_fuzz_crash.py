"""Crash consistency at every point: the k-th filesystem mutation of a command (a rename, an
unlink, a mkdir, an open for writing, a write to the lock) fails with EIO, or kills the process
(`Died`: no handler of ours catches it, and nothing after it touches the disk); then the command
runs again (train.py with --resume). Between the two every output is whole or absent; after the
rerun the outputs equal an uninterrupted run's and no temporary is left. k is a seeded sample
plus the mutations where a break was found. And real SIGKILLs at seeded instants of a run."""

import errno
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import test_train
import torch
from PIL import Image
from test_sample_cli import args as sample_args
from test_train import ROOT, args, lora_file

import convert_weights
import prepare
import sample
import train
from dit360.core import lora
from dit360.load import lora_formats
from dit360.load.weights import load_flux
from dit360.train import checkpoints

data, one_thread = test_train.data, test_train.one_thread


class Died(BaseException):
    """The process died at this mutation: nothing catches it, and no later mutation happens."""


MUTATIONS = ("replace", "rename", "unlink", "rmdir", "mkdir", "link", "pwrite", "ftruncate")
WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


@contextmanager
def faults(k: int, death: bool) -> Iterator[list[str]]:
    """Count the mutations (yielded, as they happen); the k-th raises OSError(EIO), or `Died`
    (with every one after it: the process is gone; an open for writing creates its file first)."""
    done, real_open, real = [], open, {name: getattr(os, name) for name in MUTATIONS + ("open",)}

    def hit(what: str) -> None:
        if death and len(done) >= k:
            raise Died(what)
        done.append(what)
        if len(done) == k:
            raise Died(what) if death else OSError(errno.EIO, os.strerror(errno.EIO))

    def mutate(name: str) -> Callable:
        def call(*a, **kw):
            hit(f"{name} {a[0]}")
            return real[name](*a, **kw)

        return call

    def os_open(path, flags, *a, **kw):
        if flags & WRITING:
            try:
                hit(f"os.open {path}")
            except Died:  # it was created, then the process died
                os.close(real["open"](path, flags, *a, **kw))
                raise
        return real["open"](path, flags, *a, **kw)

    def opened(file, mode="r", *a, **kw):
        if not isinstance(file, int) and set(mode) & set("wax+") and "/proc/" not in str(file):
            try:
                hit(f"open {file}")
            except Died:
                real_open(file, mode, *a, **kw).close()
                raise
        return real_open(file, mode, *a, **kw)

    with pytest.MonkeyPatch.context() as mp:
        for name in MUTATIONS:
            mp.setattr(os, name, mutate(name))
        mp.setattr(os, "open", os_open)
        mp.setattr("builtins.open", opened)
        mp.setattr("io.open", opened)
        yield done


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def ended(folder: Path) -> None:
    """What the end of the failed process does: its open files (the run's lock) closed, and its
    temporaries now those of a dead process."""
    checkpoints.HELD.clear()
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}").startswith(str(folder)):
                os.close(int(fd))
        except OSError:
            pass
    me, gone = f".tmp{os.getpid()}.", f".tmp{dead_pid()}."
    for p in sorted(folder.rglob(f"*{me}*"), key=lambda p: -len(p.parts)):  # deepest first
        p.rename(p.with_name(p.name.replace(me, gone)))


def crash(run: Callable[[], object], k: int, death: bool, capsys) -> str:
    """Run with the k-th mutation failing; the failing mutation. EIO: one line, exit 1 or 2
    (an OSError reaching the top is one line too: the scripts' excepthook)."""
    capsys.readouterr()
    with faults(k, death) as done:
        try:
            run()
        except Died:
            assert death
        except SystemExit as e:
            err = capsys.readouterr().err
            assert not death and e.code in (1, 2) and err.splitlines()[-1].startswith("error: ")
            assert "Traceback" not in err, err
        except OSError:
            assert not death
    return done[k - 1] if len(done) >= k else ""


def temps(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if re.search(r"\.tmp\d+\.", p.name)]


def picks(log: list[str], seed: int, count: int, *found: str) -> list[int]:
    """`count` seeded k's of a run of len(log) mutations, and the first matching each `found`."""
    ks = random.Random(seed).sample(range(1, len(log) + 1), min(count, len(log)))
    first = (next((i for i, w in enumerate(log, 1) if re.search(f, w)), None) for f in found)
    return sorted({*ks, *first} - {None})


def tree(folder: Path) -> dict[str, str]:
    """Each file's path and sha256."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


# --- train.py: --resume after a crash at any mutation gives the uninterrupted run's LoRA --------

# 4 steps, a checkpoint every 2, --keep 1 (step 2 removed at step 4), a preview every 2 steps
RUN = ("--max-steps", "4", "--batch-size", "1", "--grad-accum", "1", "--lr", "1e-3")
RUN += ("--save-every", "2", "--keep", "1", "--sample-every", "2", "--sample-steps", "1")
CKPT = ("lora/adapter_config.json", "lora/adapter_model.safetensors", "state.safetensors")


@pytest.fixture(scope="module")
def ref(tiny_flux, data, tmp_path_factory) -> tuple[Path, list[str], list[str]]:
    """An uninterrupted run, its mutations and its arguments (but --out)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    prompts = tmp_path_factory.mktemp("prompts") / "p.txt"
    prompts.write_text("This is a panorama. A lake.\n")
    extra = [*RUN, "--sample-prompts", str(prompts)]
    with faults(0, False) as log:
        train.main(args(tiny_flux, data, out, *extra))
    return out, log, extra


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "log.jsonl").open())]


def whole_checkpoints(out: Path, ref: Path) -> None:
    """Every checkpoint holds all its files, its LoRA that of the uninterrupted run's step."""
    for step in (out / "checkpoints").glob("step-*"):
        assert sorted(p.relative_to(step).as_posix() for p in step.rglob("*.*")) == list(CKPT)
        assert (ref / "checkpoints" / step.name).exists() or step.name == "step-00000002"
    if (out / "lora").exists():
        assert sorted(p.name for p in (out / "lora").iterdir()) == [Path(c).name for c in CKPT[:2]]


@pytest.mark.parametrize("death", [True, False], ids=["died", "eio"])
def test_train_resumes_after_a_crash_at_any_mutation(tiny_flux, data, ref, death, tmp_path, capsys):
    """Killed at the lock's temporary or the run's marker: --resume was refused ("holds files
    that no training run wrote"); while --keep removed a checkpoint: a half checkpoint stayed
    (state.safetensors without lora/). Now: the dead run's temporaries are no user's files, a
    checkpoint is hidden before it is removed, and the rerun ends as the uninterrupted run (its
    checkpoints too: killed before --keep's removal at the last step, one more stayed)."""
    (want, log, extra), lock = ref, r"os.open \S*/\.\.lock\.tmp"
    found = [
        lock,
        r"open \S*/\.\.dit360-run\.tmp",
        r"unlink \S*/step-00000002/lora/adapter_c",
        r"\brun/\.?lora\S*adapter_config",
        r"replace \S*/step-00000002$",  # --keep's removal, once step 4 is saved
    ]
    for k in picks(log, 1, 4, *found):
        out = tmp_path / f"k{k}"
        what = crash(
            lambda out=out: train.main(args(tiny_flux, data, out, *extra)), k, death, capsys
        )
        if not death and not re.match(r"(unlink|rmdir) .*\.tmp", what):  # not its own cleanup
            assert not temps(out), (k, what)
        ended(out)
        whole_checkpoints(out, want)
        train.main(args(tiny_flux, data, out, *extra, "--resume"))
        assert not temps(out), (k, what)
        whole_checkpoints(out, want)
        assert set(tree(want)) - {".lock"} <= set(tree(out)), (k, what)
        assert os.listdir(out / "checkpoints") == os.listdir(want / "checkpoints"), (k, what)
        assert losses(out) == losses(want), (k, what)
        x, y = lora_file(out), lora_file(want)
        assert x.keys() == y.keys() and all(torch.equal(x[n], y[n]) for n in x), (k, what)
        for png in (want / "samples").rglob("*.png"):  # previews redrawn where they were cut
            assert (out / png.relative_to(want)).read_bytes() == png.read_bytes()


def test_sigkill_at_seeded_instants_then_resume(tiny_flux, data, ref, tmp_path, capsys):
    """`python train.py` SIGKILLed at 2 seeded instants: while it starts (after its lock appears),
    then a --resume once it logged 1 to 3 steps; a last --resume ends with the uninterrupted
    run's LoRA and losses, bit for bit."""
    want, _, extra = ref
    out, rng = tmp_path / "killed", random.Random(7)
    env = dict(os.environ, OMP_NUM_THREADS="1")  # as the in-process run: the same sums
    for resume, steps in [((), 0), (("--resume",), rng.randint(1, 3))]:
        cmd = [sys.executable, "train.py", *args(tiny_flux, data, out, *extra, *resume)]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=-3)
        deadline = time.monotonic() + 120
        while not (out / ".lock").is_file() or f"{proc.pid} " not in (out / ".lock").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, "the run never locked"
            time.sleep(0.01)
        while steps and len(losses(out) if (out / "log.jsonl").exists() else []) < steps:
            assert proc.poll() is None and time.monotonic() < deadline, "the run never stepped"
            time.sleep(0.01)
        time.sleep(rng.uniform(0, 1.5 if not steps else 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    train.main(args(tiny_flux, data, out, *extra, "--resume"))
    assert not temps(out)
    assert losses(out) == losses(want)
    x, y = lora_file(out), lora_file(want)
    assert all(torch.equal(x[n], y[n]) for n in y)


# --- convert_weights.py: a diffusers folder replaced whole --------------------------------------


def test_convert_replaces_a_folder_whole_at_any_mutation(tiny_flux, tmp_path, capsys):
    """A previous diffusers output (the sharded transformer) replaced: between the crash and the
    rerun the folder is the old output or the new one, whole (it lost its shards one by one:
    now one renameat2 exchange), and the rerun writes the new one."""
    old, new = tiny_flux / "transformer", tmp_path / "new"
    flags = ["--base", str(tiny_flux), "--to", "diffusers", "--out"]
    convert_weights.main([*flags, str(new)])
    shutil.copytree(old, (first := tmp_path / "first"))
    with faults(0, False) as replacing:
        convert_weights.main([*flags, str(first)])
    assert tree(first) == tree(new)
    for death in (True, False):
        for k in picks(replacing, 2, 6, "unlink .*/diffusion_pytorch_model-"):
            out = tmp_path / f"k{k}{death}" / "t"
            shutil.copytree(old, out)
            what = crash(lambda out=out: convert_weights.main([*flags, str(out)]), k, death, capsys)
            ended(out.parent)
            assert {k_: v for k_, v in tree(out).items() if ".tmp" not in k_} in (
                tree(old), tree(new), {}), (k, what)  # fmt: skip
            convert_weights.main([*flags, str(out)])
            assert tree(out) == tree(new) and not temps(out.parent), (k, what)


# --- a LoRA folder (train.py's lora/, a checkpoint's, convert_weights.py's): replaced whole ------


def test_a_lora_folder_is_replaced_whole_at_any_mutation(tiny_flux, tmp_path, capsys):
    """export_peft over a previous LoRA folder, crashed at each of its mutations: the folder is
    the old LoRA or the new one, whole (its two files were written one after the other: the new
    adapter_model beside the old adapter_config), and the rerun writes the new one."""

    def lora_model(alpha: float) -> torch.nn.Module:  # A random: each one's two files differ
        base = load_flux(tiny_flux, dtype=torch.float32)
        return lora.inject(base, lora_formats.target_rows(base), rank=2, alpha=alpha, dropout=0)

    old, model = lora_formats.export_peft(lora_model(1.0), tmp_path / "old"), lora_model(2.0)
    with faults(0, False) as log:
        lora_formats.export_peft(model, (new := tmp_path / "new"))
    for death in (True, False):
        for k in range(1, len(log) + 1):
            out = tmp_path / f"k{k}{death}" / "lora"
            shutil.copytree(old, out)
            what = crash(lambda out=out: lora_formats.export_peft(model, out), k, death, capsys)
            ended(out.parent)
            files = {n: h for n, h in tree(out).items() if not re.search(r"\.tmp\d+\.", n)}
            assert files in (tree(old), tree(new)), (k, what)
            lora_formats.export_peft(model, out)
            assert tree(out) == tree(new) and not temps(out.parent), (k, what)


# --- prepare.py --overwrite: each jsonl names the files of one run ------------------------------


def test_prepare_overwrite_at_any_mutation(tmp_path, capsys):
    """prepare.py --overwrite crashed anywhere: each jsonl names files that exist (of one run);
    the rerun gives the uninterrupted run's files (but the new run's N in KIND-files-N)."""
    pano, persp = tmp_path / "pano", tmp_path / "persp"
    for folder, size, n in ((pano, (16, 32, 3), 2), (persp, (20, 20, 3), 1)):
        folder.mkdir()
        for i in range(n):
            rgb = np.random.default_rng(i).integers(0, 255, size, dtype=np.uint8)
            Image.fromarray(rgb).save(folder / f"i{i}.png")
            (folder / f"i{i}.txt").write_text(f"caption {i}")
    argv = ["--pano", str(pano), "--persp", str(persp), "--height", "32"]

    def run(out: Path, *more: str) -> None:
        prepare.main(["--out", str(out), *argv, *more])

    def files(out: Path) -> dict[str, str]:  # N varies
        return {re.sub(r"files-\d+", "N", k): v for k, v in tree(out).items()}

    def jsonl(out: Path) -> dict[str, bytes]:
        return {re.sub(r"files-\d+", "N", p.name): p.read_bytes() for p in out.glob("*.jsonl")}

    run(want := tmp_path / "want")
    with faults(0, False) as log:
        run(want, "--overwrite")
    capsys.readouterr()
    for death in (True, False):
        for k in picks(log, 3, 8):
            run(out := tmp_path / f"k{k}{death}")
            what = crash(lambda out=out: run(out, "--overwrite"), k, death, capsys)
            ended(out)
            for j in out.glob("*.jsonl"):
                for row in map(json.loads, j.open()):
                    assert all((out / row[key]).is_file() for key in ("image", "mask")), (k, what)
            run(out, "--overwrite")
            assert not temps(out), (k, what)
            assert set(files(out)) == set(files(want)) and len(jsonl(out)) == 2, (k, what)
            for j in out.glob("*.jsonl"):  # the rows, with this run's N
                assert re.sub(rb"files-\d+", b"N", j.read_bytes()) == re.sub(
                    rb"files-\d+", b"N", (want / j.name).read_bytes()
                ), (k, what)


# --- sample.py --prompts: a rerun completes the images and what goes beside them ----------------


def test_batch_rerun_completes_the_extras_at_any_mutation(tiny_flux, tmp_path, capsys, monkeypatch):
    """A batch with --viewer --cubemap --captions crashed anywhere (its images made by a stand-in
    for the model: each a function of its seed): the rerun skips the images that exist, writes
    what they lack beside them, makes the rest: the uninterrupted batch's files, byte for byte."""

    def made(jobs, opts, log):
        for job in jobs:
            rgb = np.random.default_rng(job.seed).integers(0, 256, (32, 64, 3), dtype=np.uint8)
            yield job, Image.fromarray(rgb), 0.0

    monkeypatch.setattr(sample, "generate_many", made)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(f'{{"prompt": "A {w}.", "out": "{w}.png"}}\n' for w in "ab"))
    argv = sample_args(tiny_flux, tmp_path / "x.png", "--viewer", "--cubemap", "--captions")
    argv[argv.index("--prompt") : argv.index("--prompt") + 2] = ["--prompts", str(rows)]

    def run(out: Path) -> None:
        sample.main([*argv, "--out-dir", str(out)])

    with faults(0, False) as log:
        run(want := tmp_path / "want")
    for death in (True, False):
        for k in picks(log, 4, 8, r"open .*/\.a\.png", r"open .*/\.a\.txt", r"open .*/\.a-nz"):
            out = tmp_path / f"k{k}{death}"
            what = crash(lambda out=out: run(out), k, death, capsys)
            ended(out)
            run(out)
            assert tree(out) == tree(want), (k, what)
