"""Two bounds that hostile input or bad timing could break: a LoRA's adapter_config.json regular
expressions (re backtracks: `(.*)*x` on a 30-character module name runs for hours) are refused
unless re's ways to match are bounded, fast and with one line; and several train runs racing for
one dead run's lock (real processes): exactly one takes it over, every other stops on one line."""

import io
import json
import os
import random
import re
import shutil
import signal
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_fuzz import FUZZ
from test_lora import dit360_lora
from tiny import TINY_TRANSFORMER

from dit360.core.lora import linears
from dit360.load import config
from dit360.load.files import check_json
from dit360.load.lora_formats import ADAPTER_RULES, diffusers_modules, read_lora
from dit360.load.weights import meta_flux
from dit360.train import checkpoints

# FLUX.1-dev's 19 double and 38 single blocks (the index's digits are what lengthens a name)
FLUX = meta_flux(
    config.from_diffusers_config(TINY_TRANSFORMER | {"num_layers": 19, "num_single_layers": 38})
)
NAMES = sorted({*linears(FLUX), *diffusers_modules(FLUX)})  # what a LoRA's regexes are matched to


@contextmanager
def within(seconds: float):
    """Fail (TimeoutError) rather than hang if the block runs longer (re checks for signals)."""

    def late(*_):
        raise TimeoutError(f"over {seconds} s")

    previous = signal.signal(signal.SIGALRM, late)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def test_module_names_are_short():
    """The bound counts re's ways on names of at most files.NAME characters: ours must be."""
    from dit360.load.files import NAME

    assert len(NAMES) > 500 and max(map(len, NAMES)) <= NAME


PEFT = [  # the shapes peft users write
    r".*\.(to_q|to_k|to_v)",
    r".*(attn|ff).*",
    r"^(?!.*single).*to_q$",
    r"transformer_blocks\.\d+\.attn\.to_q",
    r".*transformer_blocks\.(\d|1\d)\.(attn|ff)\..*",
    r"(?:.*\.)?(?:to_q|to_k|to_v|to_out\.0|add_[qkv]_proj)",
    r".*blocks.*attn.*",
    "all-linear",
]


SUFFIXES = ["to_q", r"attn\.to_[qkv]", r"transformer_blocks\.\d+\.attn\.to_q", r".*attn.*"]


@pytest.mark.parametrize("pattern", PEFT)
def test_peft_regexes_load(pattern):
    """peft's regular expressions in target_modules (and names or suffix regexes in rank_pattern)
    are read, and re matches them on every module name quickly."""
    check_json(
        {"target_modules": pattern, "rank_pattern": dict.fromkeys(SUFFIXES, 4)}, ADAPTER_RULES, "c"
    )
    with within(5):
        [pattern == "all-linear" or re_fullmatch(pattern, n) for n in NAMES]


def re_fullmatch(pattern: str, name: str) -> bool:
    """re.fullmatch(pattern, name) found a match (as peft matches target_modules)."""
    return re.fullmatch(pattern, name) is not None


@pytest.fixture(scope="module")
def lora(tmp_path_factory) -> Path:
    """A valid LoRA folder of the tiny model."""
    return dit360_lora(tmp_path_factory.mktemp("lora") / "a")[0]


HOSTILE = [  # most run for hours on our module names (all on a name like "aaa...!")
    {"target_modules": r"(.*)*x"},
    {"target_modules": r"(\w+\.?)+!"},
    {"target_modules": r"(a+)+$"},
    {"target_modules": r"(a|a)*b"},
    {"target_modules": r"(\w+\s?)+$"},
    {"target_modules": r"\w?" * 30 + r"\w" * 30 + "!"},
    {"target_modules": r"(?:.|\w)(?:.|\w)" * 20 + "!"},
    {"target_modules": r".*" * 8 + "!"},
    {"target_modules": "a" * 1001},
    {"rank_pattern": {r"(.*)*x": 4}},
    {"alpha_pattern": {r"(\w+|\.)+!": 4}},
    {"rank_pattern": {rf"to_q{i}|.*.*!": 4 for i in range(40)}},  # many keys, each bounded
]


@pytest.mark.parametrize("change", HOSTILE, ids=lambda c: str(c)[:40])
def test_hostile_regex_refused_fast(lora, tmp_path, change):
    """A regular expression whose matching is unbounded (a repeat of a repeat or of an alternation,
    many choices in a row, over 1,000 characters) is one ValueError naming the file and the key,
    within a second."""
    folder = tmp_path / "lora"
    shutil.copytree(lora, folder)
    path = folder / "adapter_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | change))
    model = meta_flux(config.from_diffusers_config(TINY_TRANSFORMER))
    start = time.monotonic()
    with within(5), pytest.raises(ValueError, match=f"'{next(iter(change))}' must be") as e:
        read_lora(folder, model)
    assert time.monotonic() - start < 1
    assert str(path) in str(e.value) and "\n" not in str(e.value)


ATOMS = st.sampled_from(["a", "_", ".", r"\.", r"\w", r"\d", "[a-z]", "[^.]", r"\w?", "a*"])


def grow(inner: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Sequences, alternations and repeats of smaller expressions."""
    repeat = st.sampled_from(["*", "+", "?", "{2,6}", "{,40}", "*?"])
    return st.one_of(
        st.tuples(inner, inner).map("".join),
        st.tuples(inner, inner).map(lambda t: f"(?:{t[0]}|{t[1]})"),
        st.tuples(inner, repeat).map(lambda t: f"({t[0]}){t[1]}"),
    )


HOSTILE_NAMES = ["a" * 63 + "!", "a_" * 31 + "!", "single_transformer_blocks.37.attn.to_q.x!"]


@FUZZ
@given(st.recursive(ATOMS, grow, max_leaves=10).map(lambda r: r + "!"))
def test_accepted_regexes_match_fast(pattern):
    """Any regular expression we accept matches any name of at most 64 characters quickly (one
    that we refuse is refused quickly)."""
    start = time.monotonic()
    try:
        check_json({"target_modules": pattern}, ADAPTER_RULES, "c")
    except ValueError:
        assert time.monotonic() - start < 1
        return
    with within(5):
        [re_fullmatch(pattern, s) for s in HOSTILE_NAMES + NAMES[:50]]


# --- the lock ---------------------------------------------------------------------------------

JITTER = 0.01  # seconds: the most a file operation is delayed (the race's windows opened wide)


def jitter(seed: int) -> None:
    """Delay this process's file operations at random: any interleaving of the racers can occur."""
    rng = random.Random(seed)

    def slow(call):
        def slowed(*args, **kwargs):
            time.sleep(rng.random() * JITTER)
            return call(*args, **kwargs)

        return slowed

    import fcntl

    for module, name in [(io, "open"), (fcntl, "flock")] + [
        (os, n) for n in ("open", "link", "rename", "replace", "unlink")
    ]:
        setattr(module, name, slow(getattr(module, name)))


def race(out: Path, n: int, seed: int) -> tuple[list[int], list[str]]:
    """`n` forked processes, released together, each taking out's lock; a winner holds it until
    the others ended (5 s at most), then releases it. Their exit codes and stderr."""
    (start, go), (done, over) = os.pipe(), os.pipe()
    kids = []
    for i in range(n):
        if (pid := os.fork()) == 0:  # the child: nothing of pytest's runs after os._exit
            code = 3
            try:
                os.close(go)
                os.close(over)
                sys.stderr = open(out.parent / f"err{i}", "w")  # noqa: SIM115
                jitter(seed * n + i)
                os.read(start, 1)  # every child wakes when the parent closes `go`
                lock = checkpoints.take_lock(out)
                os.read(done, 1)  # held while the others try
                checkpoints.release(lock, False)
                code = 0
            except SystemExit as e:
                code = e.code
            finally:
                sys.stderr.flush()
                os._exit(code)
        kids.append(pid)
    os.close(go)
    codes, deadline = {}, time.monotonic() + 5
    while len(codes) < n - 1 and time.monotonic() < deadline:
        pid, status = os.waitpid(-1, os.WNOHANG)
        codes |= {pid: os.waitstatus_to_exitcode(status)} if pid else {}
        time.sleep(0.001)
    os.close(over)
    codes |= {k: os.waitstatus_to_exitcode(os.waitpid(k, 0)[1]) for k in kids if k not in codes}
    os.close(start)
    os.close(done)
    return [codes[k] for k in kids], [(out.parent / f"err{i}").read_text() for i in range(n)]


@pytest.mark.parametrize("seed", range(16))
def test_racers_for_a_dead_lock(tmp_path, seed):
    """8 processes started together on a folder holding a dead process's lock: exactly one takes
    it over (saying so), every other one stops with one line saying the folder is in use; the
    winner's release leaves neither a lock nor a temporary file."""
    out = tmp_path / "out"
    out.mkdir()
    (out / ".lock").write_text(f"999999999 {socket.gethostname()}")
    codes, errors = race(out, 8, seed)
    assert sorted(codes) == [0] + [2] * 7, (codes, errors)
    said = [e.splitlines() for e in errors]
    winner = [s[0].startswith("warning: process 999999999, which held") for s in said if s]
    assert all(len(s) == 1 for s in said) and sum(winner) == 1, said
    assert all("is in use by process" in e for e, c in zip(errors, codes, strict=True) if c), errors
    assert [*out.iterdir()] == []


def test_lock_where_flock_is_refused(tmp_path, monkeypatch, capsys):
    """A file system that refuses flock (some FUSE mounts): one warning, and the run goes on with
    its `pid host` lock, released (and the folder it made removed) at its end."""
    import errno
    import fcntl

    def refuse(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    lock = checkpoints.take_lock(tmp_path / "out")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "cannot lock files (No locks available)" in err[0], err
    assert lock.read_text() == f"{os.getpid()} {socket.gethostname()}"
    checkpoints.release(lock, made=True)
    assert [*tmp_path.iterdir()] == []
