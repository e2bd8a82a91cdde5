"""sample.py batches (--prompts, --num-images, --out-dir): the images of single runs, the models
loaded once, resumed without loading, .jsonl rows, and bad rows as one-line errors."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from clitest import expect_error
from PIL import Image

import sample
from dit360.app import generate as gen
from dit360.app import text
from dit360.app.options import SampleOptions

ROOT = Path(__file__).parents[1]
PROMPTS = ["This is a panorama. A castle on a hill at sunset.", "This is a panorama. A lake."]


def flags(tiny_flux, *extra: str) -> list[str]:
    return [
        *("--base", str(tiny_flux), "--lora", "none", "--height", "32", "--width", "64"),
        *("--steps", "2", "--seed", "4", "--device", "cpu", "--dtype", "fp32", *extra),
    ]


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


@pytest.fixture(scope="module")
def singles(tiny_flux, tmp_path_factory) -> dict[tuple[int, int], np.ndarray]:
    """Single --prompt --seed runs, by (prompt index, seed)."""
    folder, images = tmp_path_factory.mktemp("singles"), {}
    for i, prompt in enumerate(PROMPTS):
        for seed in (4, 5):
            out = folder / f"{i}-{seed}.png"
            sample.main(
                [*flags(tiny_flux, "--seed", str(seed)), "--prompt", prompt, "--out", str(out)]
            )
            images[i, seed] = pixels(out)
    return images


def counted(monkeypatch, module, name: str) -> list[int]:
    """Count the calls of module.name."""
    calls, fn = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


def test_batch_equals_single_runs_and_resumes(tiny_flux, tmp_path, singles, monkeypatch, capsys):
    """2 prompts x --num-images 2: the single runs' images, pixel for pixel, with GPano metadata,
    each model loaded once; a rerun skips all 4 and loads nothing."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text(f"# castles and lakes\n{PROMPTS[0]}\n\n  {PROMPTS[1]}  \n")
    loads = [counted(monkeypatch, m, n) for m, n in
             [(text, "load_text_encoders"), (gen, "load_model"), (gen, "load_vae")]]  # fmt: skip
    argv = flags(tiny_flux, "--prompts", str(prompts), "--num-images", "2", "--out-dir", str(out))
    sample.main(argv)
    assert loads == [[1], [1], [1]]
    names = ["0000-seed4.png", "0000-seed5.png", "0001-seed4.png", "0001-seed5.png"]
    assert sorted(p.name for p in out.iterdir()) == names
    for name in names:
        i, seed = int(name[:4]), int(name[9])
        assert np.array_equal(pixels(out / name), singles[i, seed]), name
    assert 'GPano:ProjectionType="equirectangular"' in str(Image.open(out / names[0]).info["xmp"])
    printed = capsys.readouterr().out
    assert printed.count("wrote ") == 4 and "4 images written, 0 skipped" in printed
    assert "images/minute" in printed

    def fail(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(gen, "load_model", fail)
    monkeypatch.setattr(text, "load_text_encoders", fail)
    sample.main(argv)
    printed = capsys.readouterr().out
    assert printed.count("skip ") == 4 and "0 images written, 4 skipped" in printed


class Terminal(io.StringIO):
    """A stderr that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_progress_bars_on_a_terminal_only(tiny_flux, tmp_path, monkeypatch, capsys):
    """A batch whose stderr is no terminal (a log) gets no bar (no \\r redraw per image: they
    were drawn whatever stderr was), but each image's `wrote` line and the summary; on a terminal
    the weights', denoise's and decode's bars are drawn (README, Progress)."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    argv = flags(tiny_flux, "--prompts", str(prompts), "--out-dir", str(tmp_path / "log"))
    sample.main(argv)
    out, err = capsys.readouterr()
    assert out.count("wrote ") == 2 and "2 images written" in out, out
    assert "\r" not in err and not re.search("(reading .*|denoise|decode): ", err), err
    monkeypatch.setattr(sys, "stderr", terminal := Terminal())
    sample.main([*argv[:-1], str(tmp_path / "terminal")])
    assert capsys.readouterr().out.count("wrote ") == 2
    for bar in (r"\rreading \S+: ", r"\rdenoise: 100%\|", r"\rdecode: "):
        assert re.search(bar, terminal.getvalue()), (bar, terminal.getvalue())


def test_jsonl_rows(tiny_flux, tmp_path, singles):
    """.jsonl rows with their own seed and output name (relative to --out-dir), or neither."""
    rows = tmp_path / "rows.jsonl"
    lines = [{"prompt": PROMPTS[0], "seed": 5, "out": "sub/castle.png"}, {"prompt": PROMPTS[1]}]
    rows.write_text("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "out"
    sample.main(flags(tiny_flux, "--prompts", str(rows), "--out-dir", str(out)))
    assert np.array_equal(pixels(out / "sub" / "castle.png"), singles[0, 5])
    assert np.array_equal(pixels(out / "0001-seed4.png"), singles[1, 4])


def test_bad_rows(tiny_flux, tmp_path, capsys):
    """A bad row is one line naming file:line, exit 2, before anything loads; nothing written."""
    rows, good = tmp_path / "rows.jsonl", json.dumps({"prompt": "a lake"})
    argv = flags(tiny_flux, "--prompts", str(rows), "--out-dir", str(tmp_path / "out"))
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "link").symlink_to(tmp_path / "elsewhere")  # a row writing through it
    (tmp_path / "out" / "mine.png").write_bytes(b"the user's")
    (tmp_path / "out" / "ln.png").symlink_to(tmp_path / "out" / "mine.png")  # would be replaced
    for bad, match in [
        ('{"prompt": "a lake"', "not JSON"),
        ('{"seed": 3}', 'need an object with a "prompt"'),
        ('{"prompt": "a lake", "seed": "3"}', "bad 'seed'"),
        ('{"prompt": "a lake", "sed": 3}', "bad 'sed'"),
        ('{"prompt": "a lake", "steps": 0}', "steps.*integer from 1 to 1000"),
        ('{"prompt": "a lake", "out": "x.gif"}', r"\.png, \.jpg"),
        ('{"prompt": "a lake", "out": "0000-seed4.png"}', "as line 1 does"),
        ('{"prompt": "a lake", "out": "../../escape.png"}', r"escape\.png is outside --out-dir"),
        (
            '{"prompt": "a lake", "out": "/tmp/abs.png"}',
            r'abs\.png is outside --out-dir: .* no "\.\."',
        ),
        (
            '{"prompt": "a lake", "out": "link/x.png"}',
            r"link/x\.png leads outside --out-dir through",
        ),
        (
            '{"prompt": "a lake", "out": "ln.png"}',
            r"ln\.png: it is a symbolic link \(to .*mine\.png",
        ),
    ]:
        rows.write_text(f"{good}\n{bad}\n")
        expect_error(capsys, sample.main, argv, tmp_path, f"rows.jsonl:2: .*{match}")
    expect_error(
        capsys,
        sample.main,
        [*argv, "--num-images", "0"],
        tmp_path,
        r"--num-images: needs a whole number >= 1",
    )
    expect_error(capsys, sample.main, [*argv, "--prompt", "x"], tmp_path, "not allowed with")
    rows.write_text("\n")
    expect_error(capsys, sample.main, argv, tmp_path, "no prompts")
    rows.unlink()
    expect_error(capsys, sample.main, argv, tmp_path, r"--prompts .*rows\.jsonl: no such file")


def test_out_names_the_batch(tmp_path):
    """--out NAME.jpg in a batch names its outputs (it was dropped): NAME-seed{seed}.jpg for
    --prompt, NAME-{index}-seed{seed}.jpg for --prompts; without it {index}-seed{seed}.png."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    opts = SampleOptions(lora=None, device="cpu", height=1024, width=2048)
    for argv, names in [
        (["--prompt", "x", "--out", "mine.jpg"], ["mine-seed0.jpg", "mine-seed1.jpg"]),
        (["--prompts", str(prompts), "--out", "m.jpg"], ["m-0000-seed0.jpg", "m-0000-seed1.jpg",
                                                       "m-0001-seed0.jpg", "m-0001-seed1.jpg"]),
        (["--prompt", "x"], ["0000-seed0.png", "0000-seed1.png"]),
    ]:  # fmt: skip
        args = sample.parse_args([*argv, "--num-images", "2", "--out-dir", str(tmp_path)])
        assert [job.out.name for job in sample.batch_jobs(args, opts)] == names


def test_torchrun_shares_the_jobs(tiny_flux, tmp_path, singles):
    """Under torchrun (2 CPU processes) rank r makes jobs[r::2]: together the 4 images of the
    single runs; rank 0 sums up the whole batch (a gloo all-reduce) and shows the inputs' warnings
    (the size's), each once (every rank did)."""
    prompts, out = tmp_path / "prompts.txt", tmp_path / "out"
    prompts.write_text("\n".join(PROMPTS))
    argv = flags(tiny_flux, "--prompts", str(prompts), "--num-images", "2", "--out-dir", str(out))
    run = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    r = subprocess.run([*run, str(ROOT / "sample.py"), *argv], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        assert f"rank {rank} of 2: 2 images written, 0 skipped" in r.stdout, r.stdout
    assert "all 2 processes: 4 images written, 0 skipped" in r.stdout, r.stdout
    warned = [line for line in r.stderr.splitlines() if line.startswith("warning: ")]
    assert warned and len(set(warned)) == len(warned), r.stderr
    for (i, seed), expected in singles.items():
        assert np.array_equal(pixels(out / f"{i:04d}-seed{seed}.png"), expected), (i, seed)


def test_report_adds_up_a_batch():
    """A stage run once per image adds up its seconds and keeps the larger peak; the report line
    says how many times it ran."""
    import time

    from dit360.app.report import Report

    report = Report("cpu", log=lambda message: None)
    for pause in (0.01, 0.02):
        with report.stage("denoise"):
            time.sleep(pause)
    with report.stage("decode"):
        pass
    assert report.counts == {"denoise": 2, "decode": 1} and report.seconds["denoise"] >= 0.03
    assert "denoise x2 " in str(report) and "decode 0.0s" in str(report)
    peak = report.peaks["decode"][0]  # bytes / 2**30: said in GiB, not GB
    assert f"decode 0.0s (RSS peak {peak:.2f} GiB)" in str(report), str(report)
