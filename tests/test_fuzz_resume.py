"""A training run's folder tampered with, damaged or written by another version, met by
`train.py --resume`: a checkpoint no run could have written is skipped with one warning naming
it (the latest good one continues, bit-identically) or, named, refused on one line; a place past
the run or its data, a run file of another kind or size, is one error before anything is written;
the log's rows that plot_losses could not read are dropped with a warning, never a traceback."""

import json
import math
import os
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import test_train
from clitest import expect_error, snapshot
from hypothesis import given
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file
from test_fuzz import FUZZ
from test_guards import within
from test_train import RUN, args, assert_same_lora, log

import train
from dit360.app.report import open_log
from dit360.core.lora import inject
from dit360.load.files import MAX_TEXT
from dit360.load.lora_formats import target_rows
from dit360.load.weights import read_flux
from dit360.train.checkpoints import COUNTERS, MARKER, STATE, find_checkpoint
from dit360.train.data import Source, epoch_order

data, one_thread = test_train.data, test_train.one_thread
FOUR = (*RUN, "--max-steps", "4")  # checkpoints at steps 2 and 4


@pytest.fixture(scope="module")
def ran(tiny_flux, data, tmp_path_factory) -> Path:
    """An uninterrupted 4-step run: checkpoints step-00000002 and step-00000004."""
    out = tmp_path_factory.mktemp("ran")
    train.main(args(tiny_flux, data, out, *FOUR))
    return out


@pytest.fixture(scope="module")
def model(tiny_flux, data, ran):
    """The run's LoRA-injected model, on meta (what find_checkpoint checks a state against)."""
    a = train.parse_args(args(tiny_flux, data, ran, *FOUR, "--resume"))
    model = read_flux(train.weights(a).transformer)[2]
    inject(model, target_rows(model, tuple(a.targets)), a.lora_rank, a.alpha, a.dropout)
    return model


def ckpt(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def edit(folder: Path, tensors=None, **meta: str) -> None:
    """Rewrite a checkpoint's state: `tensors(state)` changes its tensors, `meta` its metadata."""
    with safe_open(folder / STATE, "pt") as f:
        state, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()  # noqa: SIM118
    save_file(tensors(state) if tensors else state, folder / STATE, metadata | meta)


def counters(folder: Path, **change: object) -> None:
    """A checkpoint's counters with `change`d values (json.dumps writes NaN as NaN)."""
    with safe_open(folder / STATE, "pt") as f:
        old = json.loads(f.metadata()["counters"])
    edit(folder, counters=json.dumps(old | change))


def each(suffix: str, change: Callable) -> Callable:
    """A tensors change: `change` applied to every state tensor whose key ends with `suffix`."""
    return lambda state: {k: change(t) if k.endswith(suffix) else t for k, t in state.items()}


def copy_run(ran: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(ran, out)
    return out


# --- a checkpoint no run wrote: skipped with one warning naming it, the previous one resumed ------

TAMPERED = {  # case: what is done to step-00000004
    "step negative": lambda p: counters(p, step=-4),
    "step a float": lambda p: counters(p, step=4.0),
    "step a bool": lambda p: counters(p, step=True),
    "step NaN": lambda p: counters(p, step=math.nan),
    "step huge": lambda p: counters(p, step=10**30),
    "step not the folder's": lambda p: counters(p, step=3),
    "epoch negative": lambda p: counters(p, epoch=-1),
    "epoch past the step": lambda p: counters(p, epoch=10**12),
    "batch negative": lambda p: counters(p, batch=-1),
    "world 0": lambda p: counters(p, world=0),
    "world negative": lambda p: counters(p, world=-1),
    "batch size 0": lambda p: counters(p, batch_size=0),
    "counters missing a key": lambda p: edit(p, counters=json.dumps({"step": 4})),
    "another step and a 1 MB key": lambda p: counters(p, step=3, note="x" * 2**20),
    "counters nested 10^5 deep": lambda p: edit(p, counters="[" * 100_000),
    "args nested 10^5 deep": lambda p: edit(p, args="[" * 100_000),
    "args a list": lambda p: edit(p, args="[1, 2]"),
    "args a 5,000-digit number": lambda p: edit(p, args='{"seed": ' + "9" * 5000 + "}"),
    "AdamW step -1": lambda p: edit(p, each("/step", lambda t: t * 0 - 1)),
    "AdamW step 2.5": lambda p: edit(p, each("/step", lambda t: t * 0 + 2.5)),
    "AdamW step past the run's": lambda p: edit(p, each("/step", lambda t: t * 0 + 1e30)),
    "AdamW steps differ": lambda p: edit(p, each("B.0/step", lambda t: t - 1)),
    "AdamW step int64": lambda p: edit(p, each("/step", lambda t: t.long())),
    "AdamW step bool": lambda p: edit(p, each("/step", lambda t: t.bool())),
    "moments bf16": lambda p: edit(p, each("/exp_avg", lambda t: t.bfloat16())),
    "moments float64": lambda p: edit(p, each("/exp_avg", lambda t: t.double())),
    "moments int32": lambda p: edit(p, each("/exp_avg", lambda t: t.int())),
    "second moments negative": lambda p: edit(p, each("/exp_avg_sq", lambda t: -t - 1)),
    "LoRA NaN": lambda p: edit(p, each(".A", lambda t: t * math.nan)),
    "a moment dropped": lambda p: edit(p, lambda s: dict(list(s.items())[1:])),
}


@pytest.mark.parametrize("case", TAMPERED)
def test_a_tampered_checkpoint_is_skipped(case, tiny_flux, data, ran, model, tmp_path, capsys):
    """--resume: the tampered step-00000004 is skipped with one short warning naming it and why,
    and step-00000002 resumes; --resume naming it is one error. Nothing in the folder changes."""
    out = copy_run(ran, tmp_path)
    TAMPERED[case](ckpt(out, 4))
    before = snapshot(out)
    a = train.parse_args(args(tiny_flux, data, out, *FOUR, "--resume"))
    capsys.readouterr()
    found = find_checkpoint(out, a, model)
    err = capsys.readouterr().err.splitlines()
    assert found is not None and found.path == ckpt(out, 2), err
    assert len(err) == 1 and err[0].startswith(f"warning: skipping checkpoint {ckpt(out, 4)}: ")
    assert len(err[0]) < 500, err[0][:1000]  # what it says of the file is short
    a.resume = str(ckpt(out, 4))
    with pytest.raises(SystemExit) as exit_info:
        find_checkpoint(out, a, model)
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: --resume {ckpt(out, 4)}: not a readable checkpoint (")
    assert snapshot(out) == before


def test_other_arguments_of_other_types_or_sizes_are_one_short_line(
    tiny_flux, data, ran, model, tmp_path, capsys
):
    """A checkpoint's recorded arguments of another type (the rank "4", printed as 4 it read as
    the same) or a megabyte long (a seed): one error listing them, as JSON gives them and cut."""
    out = copy_run(ran, tmp_path)
    with safe_open(ckpt(out, 4) / STATE, "pt") as f:
        recorded = json.loads(f.metadata()["args"])
    edit(ckpt(out, 4), args=json.dumps(recorded | dict(lora_rank="4", seed="9" * 2**20)))
    a = train.parse_args(args(tiny_flux, data, out, *FOUR, "--resume"))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        find_checkpoint(out, a, model)
    err = capsys.readouterr().err.splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and len(err[0]) < 1000, err[0][:1000]
    assert re.search(r"--lora-rank '4' \(now 4\); --seed '9{100,200} \(now 3\)", err[0]), err[0]


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=6,
)


@given(st.dictionaries(st.sampled_from(COUNTERS), st.integers(-2, 12) | JSON, max_size=2))
@FUZZ
def test_fuzzed_counters_resume_inside_the_run_or_are_skipped(
    tiny_flux, data, ran, model, tmp_path_factory, capsys, change
):
    """Any JSON values in step-00000004's counters: it is skipped (one warning naming it), or its
    place is one a run reaches (a whole step, its folder's; an epoch at most the step; a sample
    of the epoch within the data; a world and batch of at least 1), or it is one error saying
    the data is shorter. Never a traceback."""
    out = tmp_path_factory.mktemp("counters")
    for step in (2, 4):
        shutil.copytree(ckpt(ran, step), ckpt(out, step))
    counters(ckpt(out, 4), **change)
    a = train.parse_args(args(tiny_flux, data, out, *FOUR, "--resume"))
    capsys.readouterr()
    try:
        found = find_checkpoint(out, a, model)
        source = Source([None] * 4, [], 32, seed=3)  # the 4 panoramas of the run's data
        at = found and train.place(found, source, 4, a, 1)
    except SystemExit as e:  # the place is past the run or its data
        err = capsys.readouterr().err.splitlines()
        assert e.code == 2 and len(err) == 1 and err[0].startswith("error: --resume "), err
        return
    err = capsys.readouterr().err.splitlines()
    if found.path == ckpt(out, 2):
        assert len(err) == 1 and err[0].startswith(f"warning: skipping checkpoint {ckpt(out, 4)}")
        return
    c = found.counters
    assert not err and all(type(c[k]) is int for k in COUNTERS), (c, err)
    assert c["step"] == 4 and 0 <= c["epoch"] <= c["step"] and min(c["world"], c["batch_size"]) > 0
    assert at[:2] == (4, c["epoch"]) and 0 <= at[2] <= len(epoch_order(source, c["epoch"]))


# --- a place past the run or its data: one error, nothing written --------------------------------


@pytest.mark.parametrize(
    ("extra", "change", "match"),
    [
        (
            ("--max-steps", "3"),
            None,
            r"--resume \S+step-00000004 is at step 4, past this run's 3: raise --max-steps",
        ),
        (
            (),
            dict(batch=100),
            r"--resume \S+step-00000004 took 100 samples of epoch 1, which --pano and --persp "
            r"now make 4: restore the rows it was trained on, or start a new run",
        ),
    ],
    ids=["past --max-steps", "past the data"],
)
def test_a_place_past_the_run_or_its_data_is_refused(
    extra, change, match, tiny_flux, data, ran, tmp_path, capsys
):
    """A checkpoint at step 4 with --max-steps 3 (the run would end on step 4's LoRA), or one that
    took more samples of its epoch than the rows give (rows removed since): one error, exit 2,
    the folder as it was."""
    out = copy_run(ran, tmp_path)
    if change:
        counters(ckpt(out, 4), **change)
    expect_error(
        capsys, train.main, args(tiny_flux, data, out, *FOUR, *extra, "--resume"), out, match
    )


# --- run files of another kind or size: one error before anything is written ---------------------


def fifo(path: Path) -> None:
    path.unlink(missing_ok=True)
    os.mkfifo(path)


def folder(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.mkdir()
    (path / "mine.txt").write_text("mine")


def link(path: Path) -> None:
    (path.parent.parent / "users.txt").write_text("the user's\n")
    path.unlink(missing_ok=True)
    path.symlink_to(path.parent.parent / "users.txt")


def sparse(path: Path) -> None:
    with open(path, "ab") as f:
        f.truncate(MAX_TEXT + 1)


KINDS = {  # case: (the file, what is done to it, what the error says)
    "log a FIFO": ("log.jsonl", fifo, r"log.jsonl is not what a run writes there"),
    "log a folder": ("log.jsonl", folder, r"log.jsonl is not what a run writes there"),
    "log a link": ("log.jsonl", link, r"log.jsonl is not what a run writes there"),
    "log over 100 MB": ("log.jsonl", sparse, r"log.jsonl is over 100,000,000 bytes"),
    "args a folder": ("args.json", folder, r"args.json is not what a run writes there"),
    "loss.png a folder": ("loss.png", folder, r"loss.png is not what a run writes there"),
    "marker a folder": (MARKER, folder, r"holds files that no training run wrote"),
    "lock a FIFO": (".lock", fifo, r"its lock \S+ is not a file: delete it if no run is using"),
}


@pytest.mark.parametrize("case", KINDS)
@pytest.mark.parametrize("mode", ["--resume", "--overwrite"])
def test_a_run_file_of_another_kind_is_refused(case, mode, tiny_flux, data, ran, tmp_path, capsys):
    """A run's own file that is a FIFO (reading log.jsonl waited for a writer forever, the lock's
    pread raised), a folder, a link or 100 MB: one error naming it, exit 2, within seconds, the
    folder as it was."""
    out = copy_run(ran, tmp_path)
    name, change, match = KINDS[case]
    change(out / name)
    with within(30):
        expect_error(capsys, train.main, args(tiny_flux, data, out, *FOUR, mode), out, match)
    assert (tmp_path / "users.txt").read_text() == "the user's\n" if "link" in case else True


# --- step-N folders: one per step, named as a run names them -------------------------------------


def test_other_step_names_are_no_checkpoints(tiny_flux, data, ran, tmp_path, capsys):
    """Beside a tampered step-00000004: step-4 and step-000000004 (step 2's copies: a second
    checkpoint of step 4), step-٤ (other digits) and a step-99...9 holding step 2. None of the
    first three is a checkpoint (they stay as they were); the last is skipped (its counters are
    not its name's; a later step, replaced as the resume passes step 2): the resume goes on from
    step-00000002 and ends bit-identical to the unstopped run (it failed at the step-4 save,
    step-4 in the way). What no resume reads changes nothing: args.json nested 10^5 deep, the
    marker's bytes, a log line nested 10^5 deep (a traceback) among the kept rows."""
    out = copy_run(ran, tmp_path)
    (out / "args.json").write_text("[" * 100_000)
    (out / MARKER).write_bytes(b"\xff\x00" * 1000)
    rows = (out / "log.jsonl").read_text().splitlines(keepends=True)
    (out / "log.jsonl").write_text("".join([rows[0], "[" * 100_000 + "\n", *rows[1:]]))
    edit(ckpt(out, 4), each("/exp_avg_sq", lambda t: -t - 1))
    others = ["step-4", "step-000000004", "step-\u0664"]
    for name in [*others, "step-" + "9" * 30]:
        shutil.copytree(ckpt(out, 2), out / "checkpoints" / name)
    before = {n: snapshot(out / "checkpoints" / n) for n in others}
    shutil.rmtree(out / "lora")
    with pytest.warns(UserWarning, match=r"log.jsonl:2: dropped an unreadable line"):
        train.main(args(tiny_flux, data, out, *FOUR, "--resume"))
    err = capsys.readouterr().err
    skipped = re.findall(r"warning: skipping checkpoint \S+/(step-\S+): ", err)
    assert skipped == ["step-" + "9" * 30, "step-00000004"], err
    assert [r["loss"] for r in log(out)] == [r["loss"] for r in log(ran)]
    assert_same_lora(out, ran)
    assert {n: snapshot(out / "checkpoints" / n) for n in others} == before
    assert json.loads((out / "args.json").read_text())["max_steps"] == 4


# --- log.jsonl: rows plot_losses cannot read are dropped with a warning --------------------------

ROW = st.fixed_dictionaries(
    {}, optional={"step": JSON | st.integers(0, 9), "loss": JSON | st.floats(), "epoch": JSON}
)
LINE = st.one_of(
    ROW.map(json.dumps), JSON.map(json.dumps), st.text(max_size=30), st.just("[" * 100_000)
)


@given(st.lists(LINE, max_size=6))
@FUZZ
def test_fuzzed_log_lines_are_kept_readable_or_dropped(tmp_path_factory, lines):
    """Any lines after a run's rows: open_log keeps the rows up to the step and every line it
    keeps is what plot_losses reads (an object with a whole step and a float loss); the others
    are dropped, one warning each; never a traceback."""
    path = tmp_path_factory.mktemp("log") / "log.jsonl"
    good = [json.dumps(dict(step=s, epoch=0, loss=1.0 / s)) for s in (1, 2, 3)]
    path.write_text("\n".join([*good, *lines]) + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        open_log(path, 2).close()
    kept = path.read_text().splitlines()
    assert kept[:2] == good[:2]
    rows = [json.loads(line) for line in kept]
    assert all(type(r["step"]) is int and r["step"] <= 2 and type(r["loss"]) is float for r in rows)
    assert all(
        len(str(w.message).splitlines()) == 1 and "log.jsonl:" in str(w.message) for w in caught
    )
