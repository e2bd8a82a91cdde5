"""Outputs and file ownership fuzzed (README, What is guaranteed: "Outputs are atomic", "Only what
we wrote is ever removed or replaced"): hostile trees of links, look-alike names and inputs that
are outputs; every file of the user's, inside or outside the output and reached through links,
is hashed before and after, and must be unchanged."""

import argparse
import hashlib
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import test_train
import torch
from clitest import expect_error
from hypothesis import given
from hypothesis import strategies as st
from test_edit_batch import ROWS, flags, no_loads, sources, write_rows
from test_fuzz import FUZZ
from test_prepare import make_images
from test_sample_cli import args as sample_args
from test_train import args as train_args

import convert_weights
import edit
import prepare
import sample
import train
from dit360.load.files import atomic_path, clean_temps
from dit360.train import checkpoints
from dit360.train.checkpoints import (
    MARKER,
    OUTPUTS,
    STATE,
    remove_outputs,
    save_checkpoint,
    start_run,
)

data = test_train.data  # the tiny training rows, module-scoped here too


def hashes(root: Path) -> dict[str, str]:
    """Every file under root, through no link, by its sha256 (links by their target's name)."""
    found = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        if path.is_symlink():
            found[rel] = "-> " + os.readlink(path)
        elif path.is_file():
            found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def dead_pid() -> int:
    """The id of a process that has ended."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], stdout=-1)
    return int(proc.stdout)


# --- train.py's --overwrite, pruning and checkpoints: no link is followed -------------------------

# A run folder's entries: our names (files and folders) and a user's, some of them links to the
# user's folder outside --out, which holds files of our names.
NAMES = ["args.json", "log.jsonl", "loss.png", "notes.txt", "lora", "checkpoints", "samples"]
NAMES += ["tensorboard", "cache", "lora/adapter_model.safetensors", "lora/adapter_config.json"]
NAMES += ["checkpoints/step-00000005", "checkpoints/step-00000005/state.safetensors"]
NAMES += ["checkpoints/step-00000005/lora", "checkpoints/step-00000005/lora/mine.txt"]
NAMES += ["samples/step-00000002", "samples/step-00000002/00.png", "samples/step-00000002/01.png"]
NAMES += ["tensorboard/events.out.tfevents.1", "checkpoints/step-7", "lora/notes.txt"]
KINDS = st.sampled_from(["file", "folder", "link to the user's folder", "link to a user's file"])


def build(out: Path, user: Path, tree: dict[str, str]) -> None:
    """The user's folder (files of our names) and `tree` {name: kind} under out (parents first)."""
    for name in ["args.json", "state.safetensors", "00.png", "adapter_model.safetensors", "x"]:
        (user / "sub" / name).parent.mkdir(parents=True, exist_ok=True)
        (user / name).write_text(f"the user's {name}")
        (user / "sub" / name).write_text(f"the user's {name}")
    out.mkdir()
    (out / MARKER).write_text("forged or real: --overwrite acts on it")
    for name, kind in sorted(tree.items(), key=lambda kv: kv[0].count("/")):
        path = out / name
        if not path.parent.is_dir() or path.parent.is_symlink() or os.path.lexists(path):
            continue  # its parent is a file or a link: the tree cannot have it
        if kind == "file":
            path.write_text(f"the run's or the user's {name}")
        elif kind == "folder":
            path.mkdir()
        else:
            path.symlink_to(user if "folder" in kind else user / "x")


@FUZZ
@given(tree=st.dictionaries(st.sampled_from(NAMES), KINDS, max_size=12))
def test_overwrite_removes_only_our_files_and_follows_no_link(tmp_path_factory, tree):
    """--overwrite's removal (then a prune of every checkpoint) on a run folder of our names,
    a user's, and links to a user's folder outside: the user's folder is unchanged, and each file
    inside goes exactly when its path (through no link) is one of OUTPUTS."""
    root = tmp_path_factory.mktemp("tree")
    out, user = root / "run", root / "user"
    user.mkdir()
    build(out, user, tree)
    outside, inside = hashes(user), hashes(out)
    remove_outputs(out)
    for step in checkpoints.steps(out / "checkpoints").values():
        remove_outputs(out, step)  # save_checkpoint's --keep
    assert hashes(user) == outside
    goes = {rel for rel, h in inside.items() if OUTPUTS.fullmatch(rel) and not h.startswith("->")}
    assert set(hashes(out)) == set(inside) - goes


@pytest.mark.parametrize("link", ["lora", "checkpoints", "samples/step-00000002", "tensorboard"])
@pytest.mark.parametrize("mode", ["--resume", "--overwrite"])
def test_a_run_refuses_its_folders_linked_elsewhere(tiny_flux, data, tmp_path, capsys, link, mode):
    """A marked run whose own folder (or one inside) links to a user's folder holding files of
    our names: --resume and --overwrite are one line, exit 2, before the user's files are
    removed (--overwrite) or replaced (the final LoRA, the previews)."""
    out, user = tmp_path / "run", tmp_path / "user"
    user.mkdir()
    for name in ["adapter_model.safetensors", "adapter_config.json", "00.png", "log.jsonl"]:
        (user / name).write_text("mine")
    (out / link).parent.mkdir(parents=True)
    (out / MARKER).write_text("a run")
    (out / link).symlink_to(user)
    argv = train_args(tiny_flux, data, out, "--max-steps", "2", mode)
    expect_error(capsys, train.main, argv, tmp_path, rf"{link} is a link to a folder; a run")


def test_the_marker_is_not_written_through_a_link(tmp_path):
    """A `.dit360-run` that is a link to a user's file: the file is unchanged."""
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / MARKER).symlink_to(tmp_path / "notes.txt")
    start_run(tmp_path / "run", argparse.Namespace(overwrite=True))
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert not (tmp_path / "run" / MARKER).is_symlink()


@pytest.mark.parametrize("kind", ["a user's file in it", "a link to a user's folder"])
def test_a_checkpoint_never_replaces_a_users_folder(tmp_path, monkeypatch, kind):
    """checkpoints/step-N (the step being saved) holding a user's file, or a link to a user's
    folder: the save fails (the run stops with one line), the user's files stay, no temporary."""
    folder, user = tmp_path / "run" / "checkpoints", tmp_path / "user"
    step = folder / "step-00000002"
    for path in (step / "lora", user):
        path.mkdir(parents=True)
    (step / "state.safetensors").write_text("an older run's")
    if kind.startswith("a link"):
        (user / "state.safetensors").write_text("mine")
        step.rename(folder / "step-00000001")
        step.symlink_to(user)
    else:
        (step / "lora" / "notes.txt").write_text("mine")
    before = hashes(user), hashes(step / "lora")
    monkeypatch.setattr(checkpoints, "export_lora", lambda state, shell, out: out.mkdir())
    state, args = {"model/x": torch.zeros(2)}, argparse.Namespace(keep=1)
    with pytest.raises(FileExistsError, match="step-00000002 holds files no run wrote"):
        save_checkpoint(folder, state, {"step": 2}, args, torch.nn.Module())
    assert (hashes(user), hashes(step / "lora")) == before  # the older run's state went
    assert not [p for p in folder.iterdir() if ".tmp" in p.name]


# --- atomic_path and the temporaries ----------------------------------------------------------


ENTRIES = st.dictionaries(
    st.sampled_from(["config.json", "a.safetensors", "notes", ".x.tmp1.host", "é\nname"]),
    st.sampled_from(["file", "folder", "link to the user's folder", "link to a user's file"]),
    max_size=4,
)


@FUZZ
@given(old=ENTRIES, holds=st.sampled_from([".+", r"config\.json|a\.safetensors|x"]))
def test_a_folder_output_never_empties_a_folder_inside_it(tmp_path_factory, old, holds):
    """Replacing a folder output over a previous one of files, folders and links (to a user's
    folder outside): with a folder in it, or a name that is not `holds` (nor its temporary), the
    replacement fails and the old output stays whole; else the new output stands whole. A link
    goes as a link; no temporary is left."""
    root = tmp_path_factory.mktemp("atomic")
    out, user = root / "out", root / "user"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "mine.txt").write_text("mine")
    (user / "x").write_text("mine")
    out.mkdir()
    for name, kind in old.items():
        if kind == "folder":
            (out / name).mkdir()
            (out / name / "mine.txt").write_text("mine")
        elif kind == "file":
            (out / name).write_text("a previous output's")
        else:
            (out / name).symlink_to(user if "folder" in kind else user / "x")
    outside, folders = hashes(user), {n for n, k in old.items() if k == "folder"}
    named = {"config.json", "a.safetensors", ".x.tmp1.host"} if holds != ".+" else set(old)
    refused, before = folders or set(old) - named, hashes(out)
    try:
        with atomic_path(out, holds) as tmp:
            tmp.mkdir()
            (tmp / "config.json").write_text("new")
    except FileExistsError:
        assert refused and hashes(out) == before  # refused before any file of the old output went
    else:
        assert not refused and hashes(out) == {"config.json": hashlib.sha256(b"new").hexdigest()}
    assert hashes(user) == outside
    assert not [p for p in root.iterdir() if ".tmp" in p.name]


def test_temporaries_that_are_links_or_folders(tmp_path):
    """Our temporary name of a dead process that is a link (to a user's folder or file) goes as
    a link; one that is a folder goes whole (it is ours); a live pid's, another host's and
    a look-alike with a newline or unicode stay. (Found nothing broken: a guard.)"""
    host, gone, user = socket.gethostname(), dead_pid(), tmp_path / "user"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "mine.txt").write_text("mine")
    folder = tmp_path / "out"
    folder.mkdir()
    goes = {f".a.tmp{gone}.{host}": user, f".b.png.tmp{gone}.{host}": user / "sub" / "mine.txt"}
    for name, target in goes.items():
        (folder / name).symlink_to(target)
    (folder / f".é\nc.tmp{gone}.{host}").mkdir()  # ours (the name matches), left by a dead run
    stays = [f".d.tmp{os.getpid()}.{host}", f".e.tmp{gone}.{host}x", f".f.tmp{gone}.{host}\n"]
    stays += [f".g.tmp{gone}.{host}.tmp{os.getpid()}.{host}", f".h.tmp{gone}.elsewhere"]
    for name in stays:
        (folder / name).write_text("mine")
    before = hashes(user)
    clean_temps(folder)
    assert hashes(user) == before
    assert {p.name for p in folder.iterdir()} == set(stays)


# --- the commands: an output that is an input, a path through a dangling link: exit 2 ------------


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)


def test_convert_refuses_an_output_that_is_an_input(tiny_flux, tmp_path, capsys):
    """convert_weights.py --out equal to --base (file or folder), holding it, or inside it; a
    folder output holding a folder or a look-alike temporary of a user: one line, exit 2."""
    tr = tmp_path / "transformer"
    os.symlink(tiny_flux / "transformer", tr)  # the input, reached through a link
    convert_weights.main(["--base", str(tiny_flux), "--out", str(tmp_path / "f.safetensors")])
    f = tmp_path / "f.safetensors"
    (tmp_path / "d" / "config.json").mkdir(parents=True)
    (tmp_path / "d" / "config.json" / "mine.txt").write_text("mine")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / ".config.json.tmp.bak").write_text("mine")
    cases = [
        (["--base", str(f), "--out", str(f)], r"--out \S+f\.safetensors is --base"),
        (["--base", str(tr), "--to", "diffusers", "--out", str(tr)], r"is --base \S+transformer"),
        (["--base", str(f), "--to", "diffusers", "--out", str(tmp_path)], r"holds --base"),
        (["--base", str(tr), "--out", str(tr / "x.safetensors")], r"lies inside --base"),
        (["--base", str(f), "--to", "diffusers", "--out", str(tmp_path / "d")], r"config\.json"),
        (["--base", str(f), "--to", "diffusers", "--out", str(tmp_path / "e")], r"\.config\.json"),
    ]
    before = hashes(tiny_flux)
    for argv, match in cases:
        expect_error(capsys, convert_weights.main, argv, tmp_path, match)
    assert hashes(tiny_flux) == before


def test_edit_batch_never_overwrites_another_rows_source(tiny_flux, tmp_path, capsys, monkeypatch):
    """An edit's "out" that is another row's image or mask (the batch would overwrite a source
    before or after reading it): one line naming the file:line, exit 2."""
    sources(tmp_path)
    no_loads(monkeypatch)
    rows = tmp_path / "edits.jsonl"
    argv = flags(tiny_flux, "--edits", str(rows), "--out-dir", str(tmp_path / "a"))
    for row, match in [
        ({"out": "src.png"}, r'src\.png is line 1\'s "image"'),
        ({"out": "mask.png"}, r'mask\.png is line 1\'s "mask"'),
    ]:
        write_rows(rows, [ROWS[0], {**ROWS[1], **row}])
        expect_error(capsys, edit.main, argv, tmp_path, f"edits.jsonl:2: .*{match}")


def test_outputs_through_a_dangling_link_are_refused_up_front(
    tiny_flux,
    data,
    tmp_path,
    capsys,
    no_cuda,
):
    """An output whose folder is a dangling link (or that is one: train.py, prepare.py): one
    line, exit 2, before any model runs (it used to fail after the run, exit 1, or a
    traceback)."""
    work, link = tmp_path / "work", tmp_path / "dangling"  # where the outputs would go: work
    make_images(work / "pano", {"a.png": (64, 32)})
    link.symlink_to(work / "nowhere")
    cases = [
        (
            sample.main,
            sample_args(tiny_flux, link / "x.png"),
            r"cannot write --out \S+x\.png: check",
        ),
        (
            convert_weights.main,
            ["--base", str(tiny_flux), "--out", str(link / "f.safetensors")],
            "",
        ),
        (prepare.main, ["--pano", str(work / "pano"), "--out", str(link)], "is not a writable"),
        (train.main, train_args(tiny_flux, data, link), r"dangling is not a folder this user"),
    ]
    for main, argv, match in cases:
        expect_error(capsys, main, argv, work, match or "cannot write there")
    assert link.is_symlink() and not (work / "nowhere").exists()


def test_prepare_replaces_only_a_runs_files_folders(tmp_path, capsys):
    """prepare.py --pano inside --out's pano-files-N (which a run replaces): one line, exit 2;
    a first run (no pano.jsonl) into a folder holding a user's pano-files-N leaves it."""
    make_images(tmp_path / "data" / "pano-files-3", {"a.png": (64, 32)})
    argv = ["--out", str(tmp_path / "data"), "--pano", str(tmp_path / "data" / "pano-files-3")]
    expect_error(capsys, prepare.main, argv + ["--overwrite"], tmp_path, r"is inside pano-files-3")
    make_images(tmp_path / "pano", {"b.png": (64, 32)})
    before = hashes(tmp_path / "data")
    prepare.main(["--out", str(tmp_path / "data"), "--pano", str(tmp_path / "pano")])
    assert before.items() <= hashes(tmp_path / "data").items()


# --- refused up front, not late: every output of a command, links loops, a run's folders --------
# (each case failed late, exit 1 after the work, or named no flag, before these rules)

BESIDE = [("--viewer", "{}.html"), ("--captions", "{}.txt"), ("--cubemap", "{}-nz.png")]


def edit_argv(tiny_flux, folder: Path, out: Path, *extra: str) -> list[str]:
    """edit.py's one edit of a source and mask (written in folder/src), to `out`."""
    (folder / "src").mkdir(exist_ok=True)
    image, mask = sources(folder / "src") / "a" / "src.png", folder / "src" / "a" / "mask.png"
    argv = ["--image", str(image), "--mask", str(mask), "--prompt", "p", "--out", str(out)]
    return flags(tiny_flux, *argv, *extra)


@pytest.mark.parametrize(("flag", "name"), BESIDE)
def test_files_beside_the_panorama_are_checked_up_front(
    tiny_flux, tmp_path, capsys, monkeypatch, flag, name
):
    """The file a flag writes beside --out (or beside a batch's output) that is a folder: one
    line naming it, exit 2, before any model loads (it failed after the panorama was written)."""
    no_loads(monkeypatch)
    (tmp_path / name.format("x")).mkdir()
    (tmp_path / "b" / name.format("x-seed4")).mkdir(parents=True)
    match = rf"{name.format('x')} \(beside --out \S+x\.png\): it is a folder"
    runs = [
        (sample.main, sample_args(tiny_flux, tmp_path / "x.png", flag)),
        (edit.main, edit_argv(tiny_flux, tmp_path, tmp_path / "x.png", flag)),
        (sample.main, sample_args(tiny_flux, tmp_path / "b" / "x.png", flag, "--num-images", "2")),
    ]
    for i, (main, argv) in enumerate(runs):
        expect_error(capsys, main, argv, tmp_path, match if i < 2 else r"--prompt:1: .*folder")


def test_outputs_through_a_link_loop_are_one_line_naming_out(tiny_flux, tmp_path, capsys):
    """--out through a symbolic-link loop (a link to itself, two links to each other, a folder
    below one): one line naming --out, exit 2, before any weight is read (convert_weights.py
    raised a traceback or failed late; edit.py's line named no flag)."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "b").symlink_to(tmp_path / "c")
    (tmp_path / "c").symlink_to(tmp_path / "b")
    for below in ["loop", "b", "loop/sub"]:
        out = tmp_path / below / "x"
        for argv in [[], ["--to", "diffusers"]]:
            argv += ["--base", str(tiny_flux), "--out", f"{out}{'' if argv else '.safetensors'}"]
            expect_error(capsys, convert_weights.main, argv, tmp_path, rf"--out \S+{below}/x")
        argv = edit_argv(tiny_flux, tmp_path, out.with_suffix(".png"))
        expect_error(capsys, edit.main, argv, tmp_path, rf"--out \S+{below}/x\.png: check")
        argv = sample_args(tiny_flux, out.with_suffix(".png"))
        expect_error(capsys, sample.main, argv, tmp_path, rf"--out \S+{below}/x\.png: check")


@pytest.mark.parametrize(
    "odd",
    [
        "checkpoints/step-00000004/notes.txt",  # a step the resumed run writes again
        "checkpoints/step-00000004/lora/mine/",
        "checkpoints/step-00000006",  # a file where the checkpoint's folder goes
        "lora/adapter_model.safetensors/",  # a folder where the LoRA's file goes
        "lora/notes.txt",  # lora/ is replaced whole: it would go
        "samples/step-00000002/00.png/",
        "checkpoints/step-00000004/state.safetensors -> notes.txt",
    ],
)
@pytest.mark.parametrize("mode", ["--resume", "--overwrite"])
def test_a_runs_folders_hold_only_its_layout(tiny_flux, data, tmp_path, capsys, odd, mode):
    """A marked run whose folders hold, where the run writes, what it does not write (a user's
    file in a checkpoint folder, a folder where a file goes, a link): --resume and --overwrite
    are one line naming it, exit 2, up front (the checkpoint's save failed late, exit 1)."""
    out = tmp_path / "run"
    (out / "checkpoints" / "step-00000002" / "lora").mkdir(parents=True)
    (out / "checkpoints" / "step-00000002" / STATE).write_text("a checkpoint")
    (out / MARKER).write_text("a run")
    (out / "log.jsonl").write_text('{"step": 2}\n')
    (tmp_path / "notes.txt").write_text("mine")
    name, _, target = odd.partition(" -> ")
    (out / name).parent.mkdir(parents=True, exist_ok=True)
    if target:
        (out / name).symlink_to(tmp_path / target)
    elif name.endswith("/"):
        (out / name).mkdir()
    else:
        (out / name).write_text("mine")
    argv = train_args(tiny_flux, data, out, "--max-steps", "6", "--save-every", "2", mode)
    expect_error(capsys, train.main, argv, tmp_path, rf"{name.rstrip('/')} is not what a run")


def test_a_read_only_out_is_not_replaced(tiny_flux, tmp_path, capsys, monkeypatch):
    """An existing --out (or a file beside it) its owner made read-only: sample.py and edit.py
    refuse it up front (they silently replaced it), as cp and shell redirection do; a batch
    output made with other settings that is read-only is refused by --overwrite too."""
    no_loads(monkeypatch)
    for name in ["x.png", "y.html", "b/x-seed4.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"mine")
        (tmp_path / name).chmod(0o444)
    fix = r": it is read-only: chmod u\+w it or choose another --out"
    for argv, shown in [
        ([], rf"--out \S+x\.png{fix}"),
        (["--viewer"], rf"y\.html \(beside --out \S+\){fix}"),
    ]:
        out = tmp_path / ("y.png" if argv else "x.png")
        expect_error(capsys, sample.main, sample_args(tiny_flux, out, *argv), tmp_path, shown)
        expect_error(capsys, edit.main, edit_argv(tiny_flux, tmp_path, out, *argv), tmp_path, shown)
    batch = sample_args(tiny_flux, tmp_path / "b" / "x.png", "--num-images", "2")
    expect_error(
        capsys, sample.main, batch, tmp_path, r"records no settings\): --overwrite replaces"
    )
    expect_error(
        capsys, sample.main, [*batch, "--overwrite"], tmp_path, r"x-seed4\.png: it is read"
    )
