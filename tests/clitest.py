"""Checking a command's bad-input behaviour: one line `error: ...`, a non-zero exit, no traceback,
and the folder exactly as it was (no output, no temporary or partial file)."""

import re
from collections.abc import Callable
from pathlib import Path

import pytest


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file, folder and link (not followed: a loop) under `folder` (hidden ones too) with
    its size and mtime."""
    return {
        str(p.relative_to(folder)): (p.lstat().st_size, p.lstat().st_mtime_ns)
        for p in sorted(Path(folder).rglob("*"))
    }


def expect_error(
    capsys: pytest.CaptureFixture,
    main: Callable[[list[str]], object],
    argv: list[str],
    folder: Path,
    match: str,
    code: int = 2,
) -> str:
    """Run `main(argv)` in process; it must exit with `code` and one stderr line `error: ...`
    matching `match`, and leave `folder` unchanged. Returns the line."""
    before = snapshot(folder)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == code, (exit_info.value.code, err)
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert re.search(match, err), (match, err)
    assert snapshot(folder) == before, "the command left files behind or changed them"
    return err
