"""Windows and macOS: the scripts run end to end where Windows' Python lacks what Linux has
(simulated: never run on a real Windows or Mac here), text is UTF-8 whatever the locale, no
process is signalled where a signal would end it, and macOS's peak RSS is read in its unit."""

import ast
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from clitest import expect_error
from PIL import Image
from test_editing import write_inputs

import prepare
import sample
from dit360.app import report
from dit360.load import files

ROOT = Path(__file__).parents[1]
# Loaded before each script (first on PYTHONPATH): what Windows' Python has not is taken away, what
# acts otherwise there acts so, and a call of ours without an encoding (PEP 597) is an error.
WINDOWS = r"""
import builtins, ctypes, os, re, warnings

OURS = r"(dit360|__main__)(\.|$)"  # our modules and scripts (a library's Linux parts need them)
del os.O_NONBLOCK, os.O_NOFOLLOW


def imports(name, globals=None, *args, _import=builtins.__import__, **kw):
    if name in ("resource", "fcntl") and re.match(OURS, (globals or {}).get("__name__", "")):
        raise ImportError(f"No module named {name!r}")
    return _import(name, globals, *args, **kw)


class CDLL(ctypes.CDLL):
    def __init__(self, name, *args, **kwargs):
        if name is None:  # Windows: no process-wide symbol table
            raise TypeError("expected str, bytes or os.PathLike object, not NoneType")
        super().__init__(name, *args, **kwargs)


def kill(pid, sig):
    raise AssertionError(f"os.kill({pid}, {sig}): on Windows this terminates the process")


def replace(src, dst, *, _replace=os.replace, **kw):
    if os.path.isdir(dst):  # MoveFileEx replaces a file, never a folder (even an empty one)
        raise PermissionError(13, "Access is denied", str(dst))
    _replace(src, dst, **kw)


builtins.__import__, ctypes.CDLL, os.kill, os.replace = imports, CDLL, kill, replace
warnings.filterwarnings("ignore", category=EncodingWarning)  # a library's: Linux's code paths
warnings.filterwarnings("error", category=EncodingWarning, module=OURS)
"""
# macOS: Python starts a process by spawn (Linux: fork), so the loader's workers get what they run
# pickled; MPS is no device of torch.distributed: train.py runs on the CPU there (gloo).
MACOS = r"""
import multiprocessing, warnings

multiprocessing.set_start_method("spawn", force=True)
warnings.filterwarnings("ignore", category=EncodingWarning)
warnings.filterwarnings("error", category=EncodingWarning, module=r"(dit360|__(mp_)?main__)(\.|$)")
"""
TINY = ("--device", "cpu", "--dtype", "fp32", "--lora", "none", "--steps", "2", "--seed", "4")
EXTRAS = ("--viewer", "--captions", "--cubemap")
CAFE = "This is a panorama. A café at dawn, ☕ and 東京 signs."  # not cp1252 text


def run_on(system: str, tmp_path: Path, *argv: object) -> subprocess.CompletedProcess:
    """`python -X warn_default_encoding *argv` in the repository, `system` loaded first."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(system, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    env["PYTHONIOENCODING"] = "cp1252"  # Windows' standard streams to a pipe or a file
    cmd = [sys.executable, "-X", "warn_default_encoding", *map(str, argv)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, encoding="cp1252",
                          errors="replace")  # fmt: skip


def ok(r: subprocess.CompletedProcess) -> str:
    """The run's stdout, once it exited 0 with no error of ours on stderr."""
    assert r.returncode == 0 and "Error" not in r.stderr, r.stderr[-3000:]
    return r.stdout


def test_simulated_windows_takes_effect(tmp_path):
    """Under WINDOWS, what it takes away is gone and our missing encodings raise: else the runs
    below would prove nothing."""
    probe = (
        "import ctypes, os, sys, warnings\n"
        "assert not hasattr(os, 'O_NONBLOCK') and not hasattr(os, 'O_NOFOLLOW')\n"
        "for name in ('resource', 'fcntl'):\n"
        "    try: exec('import ' + name)\n"
        "    except ImportError: pass\n"
        "    else: raise SystemExit(name)\n"
        "for call in (lambda: ctypes.CDLL(None), lambda: os.kill(os.getpid(), 0)):\n"
        "    try: call()\n"
        "    except (TypeError, AssertionError): pass\n"
        "    else: raise SystemExit('not simulated')\n"
        "try: open(sys.argv[1], 'w')\n"
        "except EncodingWarning: print('raised')\n"
    )
    assert ok(run_on(WINDOWS, tmp_path, "-c", probe, tmp_path / "x.txt")).strip() == "raised"


def test_scripts_run_on_simulated_windows(tiny_flux, tmp_path):
    """sample.py (a batch from a UTF-8 .jsonl, an output name not in cp1252) and edit.py with
    every extra output, prepare.py on the result, convert_weights.py twice into one folder, the
    info and view commands run under WINDOWS; train.py refuses in one line, writes nothing."""
    row = json.dumps({"prompt": CAFE, "out": "café ☕.png"}, ensure_ascii=False)
    (prompts := tmp_path / "prompts.jsonl").write_text(row + "\n", encoding="utf-8")
    gen = tmp_path / "gen"
    base = ("--base", tiny_flux, "--height", "32")
    sample_py = ("sample.py", "--prompts", prompts, "--out-dir", gen)
    ok(run_on(WINDOWS, tmp_path, *sample_py, *base, *TINY, *EXTRAS))
    pano = gen / "café ☕.png"
    assert pano.with_suffix(".txt").read_text(encoding="utf-8") == CAFE + "\n"
    assert "<title>café ☕</title>" in pano.with_suffix(".html").read_text(encoding="utf-8")
    assert (gen / "café ☕-px.png").is_file()

    src, mask = write_inputs(tmp_path / "edit")
    edited = tmp_path / "edit" / "out.png"
    edit = ("--image", src, "--mask", mask, "--prompt", CAFE, "--out", edited)
    ok(run_on(WINDOWS, tmp_path, "edit.py", *edit, *base, *TINY, *EXTRAS))
    assert edited.with_suffix(".txt").read_text(encoding="utf-8") == CAFE + "\n"

    data, panos = tmp_path / "data", tmp_path / "panos"
    panos.mkdir()
    for p in (pano, pano.with_suffix(".txt")):
        (panos / p.name).write_bytes(p.read_bytes())
    ok(run_on(WINDOWS, tmp_path, "prepare.py", "--pano", panos, "--out", data))
    assert CAFE in (data / "pano.jsonl").read_text(encoding="utf-8")

    converted = tmp_path / "converted"
    convert = ("convert_weights.py", "--base", tiny_flux, "--to", "diffusers", "--out", converted)
    for _ in range(2):  # the second replaces the first's folder
        ok(run_on(WINDOWS, tmp_path, *convert))
    assert (converted / "config.json").is_file()

    assert "sample.py" in ok(run_on(WINDOWS, tmp_path, "-m", "dit360.app.info", pano))
    ok(run_on(WINDOWS, tmp_path, "-m", "dit360.app.view", pano, "--out", tmp_path / "view.html"))
    assert "data:image/png;base64," in (tmp_path / "view.html").read_text(encoding="utf-8")

    run = tmp_path / "run"
    r = run_on(WINDOWS, tmp_path, "train.py", "--pano", data / "pano.jsonl", "--out", run, *base)
    assert r.returncode == 2 and r.stderr.startswith("error: train.py needs"), r.stderr[-3000:]
    assert len(r.stderr.strip().splitlines()) == 1 and "WSL2" in r.stderr
    assert not run.exists()
    assert not [p for p in tmp_path.rglob("*.tmp*")], "a temporary was left"


def test_train_runs_on_simulated_macos(tiny_flux, tmp_path):
    """train.py with a loader process started by spawn (MACOS) trains and exports its LoRA."""
    Image.new("RGB", (64, 32), (90, 140, 200)).save(tmp_path / "p.png")
    row = json.dumps({"image": "p.png", "caption": CAFE}, ensure_ascii=False)
    (rows := tmp_path / "pano.jsonl").write_text(row + "\n", encoding="utf-8")
    run = ("--pano", rows, "--out", tmp_path / "run", "--workers", "1", "--max-steps", "1")
    run += ("--grad-accum", "1", "--lora-rank", "4", "--device", "cpu")
    ok(run_on(MACOS, tmp_path, "train.py", "--base", tiny_flux, "--height", "32", *run))
    assert (tmp_path / "run" / "lora" / "adapter_model.safetensors").is_file()


def test_batch_names_differing_in_case(tiny_flux, tmp_path, capsys):
    """Two rows whose outputs differ only in case write one file on Windows and macOS (their file
    systems ignore case): refused, or the second would replace the first."""
    rows = [{"prompt": CAFE, "out": name} for name in ("Pano.png", "pano.png")]
    lines = "".join(json.dumps(row) + "\n" for row in rows)
    (prompts := tmp_path / "rows.jsonl").write_text(lines, encoding="utf-8")
    argv = ["--prompts", str(prompts), "--out-dir", str(tmp_path / "out"), "--base", str(tiny_flux)]
    match = r"rows.jsonl:2: writes .*line 1 does \(Pano.png: Windows and macOS ignore case"
    expect_error(capsys, sample.main, [*argv, *TINY], tmp_path, match)


def test_compile_without_triton(tiny_flux, tmp_path, capsys, monkeypatch):
    """--compile on a CUDA GPU where triton is not installed (Windows' torch has none) is refused
    before anything loads, not a compiler's traceback at the first step."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    find = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "triton" else find(n, *a)
    )
    argv = ["--prompt", CAFE, "--base", str(tiny_flux), "--lora", "none", "--device", "cuda"]
    argv += ["--compile", "--out", str(tmp_path / "p.png")]
    expect_error(capsys, sample.main, argv, tmp_path, "--compile on a CUDA GPU needs triton")


@pytest.mark.parametrize("fp8", ["--fp8", "--t5-fp8"])
def test_fp8_on_mps_is_refused_before_loading(tiny_flux, tmp_path, capsys, monkeypatch, fp8):
    """MPS has no float8 dtype (pytorch/pytorch#132624): --fp8 or --t5-fp8 with --device mps is
    one line naming the flag before anything loads, not a TypeError traceback at load."""
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    argv = ["--prompt", CAFE, "--base", str(tiny_flux), "--lora", "none", "--device", "mps"]
    argv += [fp8, "--out", str(tmp_path / "p.png")]
    expect_error(
        capsys,
        sample.main,
        argv,
        tmp_path,
        f"^error: {fp8}.* needs float8 tensors, which MPS lacks",
    )


@pytest.mark.parametrize("cuda,mps", [(True, True), (False, True), (False, False)])
def test_the_default_device(monkeypatch, cuda, mps):
    """No --device: CUDA's GPU, else Apple Silicon's (MPS), else the CPU with a warning that says
    why and what to install (a CPU build of torch, as PyPI's on Windows: hours at full size). The
    default dtype is bf16 on a GPU, MPS's too (fp32 FLUX.1-dev is 48 GB of unified memory)."""
    from dit360.app.options import SampleOptions

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: int(cuda))
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None)
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        opts = SampleOptions()
    device = "cuda" if cuda else "mps" if mps else "cpu"
    assert (opts.device, opts.dtype) == (
        device,
        torch.float32 if device == "cpu" else torch.bfloat16,
    )
    said = [w for w in warned if "no GPU" in str(w.message)]
    assert len(said) == (device == "cpu")  # a GPU found: nothing said
    for w in said:
        assert str(w.message).startswith("no GPU (this torch is a CPU build): running on the CPU")
        assert "install a CUDA build of torch" in str(w.message) and w.filename == __file__
    monkeypatch.setattr(torch.version, "hip", "6.4")  # ROCm's build, no GPU seen: not a CPU build
    if device == "cpu":
        with pytest.warns(UserWarning, match=r"^no GPU \(none is seen\)"):
            SampleOptions()


def test_no_signal_where_kill_terminates(tmp_path, monkeypatch):
    """Without POSIX kill semantics (Windows: os.kill ends the process) no pid is signalled and
    a dead run's temporary stays; with them it is removed (so the test can tell)."""
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True)  # fmt: skip
    out = tmp_path / "a.bin"
    left = files.temp_path(out, f"{child.stdout.strip()}.{files.socket.gethostname()}")
    for asks in (False, True):
        left.write_bytes(b"a killed run's")
        if not asks:
            monkeypatch.setattr(os, "kill", lambda *a: pytest.fail(f"os.kill{a}"))
        monkeypatch.setattr(files, "KILL_ASKS", asks)
        with files.atomic_path(out) as tmp:
            tmp.write_bytes(b"ours")
        assert out.read_bytes() == b"ours" and left.exists() != asks
        monkeypatch.undo()


@pytest.mark.parametrize("platform, unit", [("darwin", 1), ("linux", 1024)])
def test_peak_rss_without_proc(monkeypatch, platform, unit):
    """Without /proc, the peak RSS from getrusage: ru_maxrss counts bytes on macOS, kB on Linux
    (getrusage(2) of each); Windows has neither: 0, and the report leaves it out."""
    monkeypatch.setattr(sys, "platform", platform)
    monkeypatch.setattr(report, "_status_gb", lambda field: None)
    usage = SimpleNamespace(ru_maxrss=3 * 2**30 // unit)  # 3 GiB
    monkeypatch.setattr(report, "resource", SimpleNamespace(getrusage=lambda who: usage,
                                                            RUSAGE_SELF=0))  # fmt: skip
    assert report.peak_memory_gb("cpu") == 3.0
    monkeypatch.setattr(report, "resource", None)
    assert report.peak_memory_gb("cpu") == 0.0
    run = report.Report(log=lambda m: None)
    with run.stage("load"):
        pass
    assert "peak" not in str(run) and str(run).startswith("load 0.")


def test_mps_stage_waits_for_the_gpu(monkeypatch):
    """On MPS, as on CUDA, a stage's time ends once the GPU has done its work (it runs behind),
    and its cached memory goes back (to the unified memory the system shares) after it."""
    calls = []
    monkeypatch.setattr(torch.mps, "synchronize", lambda: calls.append("synchronize"))
    monkeypatch.setattr(torch.mps, "empty_cache", lambda: calls.append("empty_cache"))
    run = report.Report(device="mps", log=lambda m: None)
    with run.stage("denoise"):
        assert not calls
    assert calls == ["synchronize", "empty_cache"]


def test_prepare_out_on_another_drive(tmp_path, monkeypatch):
    """--pano on another Windows drive than --out: no relative path between them (relpath's
    ValueError there) is no refusal."""

    def relpath(path, start=None):
        raise ValueError("path is on mount 'D:', start on mount 'C:'")

    monkeypatch.setattr(os.path, "relpath", relpath)
    (tmp_path / "pano").mkdir()
    Image.new("RGB", (64, 32)).save(tmp_path / "pano" / "a.png")
    prepare.check_args(tmp_path / "out", tmp_path / "pano")


def unencoded(tree: ast.AST) -> list[int]:
    """Lines that open, read or write text with no `encoding=` (the locale's: cp1252 on Windows)."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else f".{getattr(func, 'attr', '')}"
        mode = node.args[1] if len(node.args) > 1 else None
        mode = next((k.value for k in node.keywords if k.arg == "mode"), mode)
        binary = isinstance(mode, ast.Constant) and "b" in str(mode.value)
        if name in (".read_text", ".write_text") or name in ("open", ".fdopen") and not binary:
            lines.append(node.lineno)
    return lines


def test_text_names_its_encoding():
    """Every text file the package and scripts open, read or write says encoding= (static)."""
    sources = [*ROOT.glob("dit360/**/*.py"), *ROOT.glob("*.py")]
    found = {
        f"{p.relative_to(ROOT)}:{n}": n
        for p in sources
        for n in unencoded(ast.parse(p.read_bytes()))
    }
    assert len(sources) > 40 and not found, sorted(found)


def test_train_without_a_gpu_warns(monkeypatch, capsys):
    """train.py with no --device and no GPU trains on the CPU, saying why and what to install;
    --device cpu says nothing."""
    import train

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    assert train.check_device(None) == torch.device("cpu")
    err = capsys.readouterr().err
    assert err.startswith("warning: no GPU (this torch is a CPU build): training on the CPU")
    assert "takes days; install a CUDA build of torch" in err and err.count("\n") == 1
    assert train.check_device("cpu") == torch.device("cpu") and capsys.readouterr().err == ""
