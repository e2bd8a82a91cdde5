"""What every command shares with no heavy import, so a script sets it up before torch loads: the
stated limits, one-line errors (`fail`; a resource that ran out with its fix: `RAN_OUT`), SIGINT,
SIGTERM and an uncaught OSError as one line from the first second on (`handle_signals`,
`run_main`), standard streams a line always reaches, a first line at once on a terminal
(`starting`)."""

import atexit
import errno
import os
import re
import signal
import sys
import warnings
from collections.abc import Callable
from typing import Any, NoReturn

# The stated limits (README, What is guaranteed): each size from a flag or a file is checked
# against them before anything is allocated.
PROMPT_CHARS = 20_000  # T5 reads 512 tokens, ~2,500 characters; a 10 MB prompt took 51 s to cut
STEPS = 1000  # sampling steps: the modulations of every step are computed ahead
SIDE = 8192  # pixels a side of what we make: <= 67 M pixels, under PIL's limit, so all reads back
JOBS = 100_000  # images of one batch (rows x --num-images)
GUIDANCE = 100  # the guidance input's magnitude (FLUX.1-dev was distilled on 1 to ~5)
SURROGATE = re.compile("[\ud800-\udfff]")  # how Python decodes an argument's non-UTF-8 byte
# what says a folder the user set for a cache or temporaries cannot be made or written (not a
# failed read of a file in it)
UNMADE = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOTDIR, errno.EEXIST)
REFUSED = (ValueError, OSError, RuntimeError)  # bad input (RuntimeError: a link loop, < 3.13)
LATE = (ValueError, OSError, FloatingPointError)  # once every check passed: exit 1, not 2

SIGNALS = {signal.SIGINT: (130, "interrupted"), signal.SIGTERM: (143, "terminated")}
# run_main's main runs; the last signal; the running command's flags (its Parser records them);
# an error's line said (`on_exit` adds none)
STATE: dict[str, Any] = {"running": False, "got": None, "flags": (), "said": False}
SHOWN: set[str] = set()  # the warning lines shown (one_line_warning)
# What an error's text says ran out (the OS's, torch's allocator, gloo's, the loader's), the fix
# its line ends with, and the options that use less, named where the running command has them:
# wherever it is caught, or nowhere (`on_uncaught`), it is one line, exit 1.
RAN_OUT = {
    r"MemoryError|allocate memory|Unable to allocate|out of memory|failed to map segment": (
        "out of memory: free some memory",
        ("--height", "--width", "--batch-size", "--offload", "--fp8", "--base-dtype fp8")
        + ("--refine-face-size", "--refine-batch", "--refine-offload", "--refine-fp8"),  # prepare
    ),
    r"Too many open files": ("raise the limit of open files (ulimit -n)", ("--workers",)),
    r"No space left|File too large|Disk quota": (
        "free space there, write elsewhere, or raise the file size limit (ulimit -f)",
        (),
    ),
}


def fail(message: object, code: int = 2) -> NoReturn:
    """Stop with one line `error: ...` on stderr; code 2: bad usage, 1: a failure, 130 / 143: a
    signal (which only rank 0 reports under torchrun)."""
    if code not in (130, 143) or os.environ.get("RANK", "0") == "0":
        say(message)
    raise SystemExit(code)


def say(message: object) -> None:
    """Write the line `error: {said(message)}`."""
    STATE["said"] = True  # `on_exit` adds no second line
    sys.stderr.write(f"error: {said(message)}\n")


def said(message: object) -> str:
    """`message` `one_line`, with the fix if it says that a resource ran out (`RAN_OUT`)."""
    text = one_line(message) or type(message).__name__  # a MemoryError may say nothing
    told = f"{type(message).__name__}: {text}"
    for name, value in os.environ.items() if getattr(message, "errno", 0) in UNMADE else ():
        if re.search("TMP|TEMP|CACHE|_HOME", name) and value and f"'{value}" in text:
            text += f" (from {name}={value}: make it a folder you can write, or unset it)"
    for pattern, (fix, options) in RAN_OUT.items():
        if re.search(pattern, told):
            less = ", ".join(o for o in options if o.split()[0] in STATE["flags"])
            return f"{text}: {fix}" + (f", or use less with: {less}" if less else "")
    return text


def on_uncaught(kind: type, e: BaseException, tb: object) -> None:
    """sys.excepthook: an OSError or a resource run out as one line (exit 1); else the traceback."""
    if isinstance(e, (OSError, MemoryError)) or said(e) != one_line(e):
        say(e)
    else:
        sys.__excepthook__(kind, e, tb)


def printable(text: object) -> str:
    """`text` with what is not printable but line breaks escaped: control characters (\\r, ESC:
    they could show the terminal another text), a lone surrogate (a name's undecodable byte)."""
    return "".join(c if c.isprintable() or c == "\n" else ascii(c)[1:-1] for c in str(text))


def one_line(message: object) -> str:
    """`message` `printable` on one line, but a break before an indented line (a listing)."""
    return re.sub(r"\n(?!  )", r"\\n", printable(message))


def check_prompt(text: str, what: str) -> str:
    """`text`, or ValueError naming `what` if it is longer than PROMPT_CHARS (before tokenizing)
    or holds a lone surrogate (an argument's undecodable byte: not text a tokenizer reads)."""
    if len(text) > PROMPT_CHARS:
        raise ValueError(
            f"{what} is {len(text):,} characters: at most {PROMPT_CHARS:,} (T5 reads 512 tokens, "
            "about 2,500 characters): shorten it"
        )
    if SURROGATE.search(text):
        raise ValueError(f"{what} is not UTF-8 text (an undecodable byte): give it as UTF-8")
    return text


def torchrun() -> tuple[int, int, int]:
    """(RANK, WORLD_SIZE, LOCAL_RANK), (0, 1, 0) without torchrun; a set it never makes: exit 2."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")  # and MASTER_ADDR
    if not ({"RANK", "WORLD_SIZE"} & set(os.environ)):
        return 0, 1, 0
    # LOCAL_RANK 0 if unset: launchers that start one process a machine (Kubeflow's) set no other
    given = [os.environ.get(k, "0" if k == "LOCAL_RANK" else "") for k in names]
    rank, world, local, port = (int(v) if v.isdecimal() else -1 for v in given)
    if not (0 <= rank < world and local >= 0 and 0 < port < 65536 and os.getenv("MASTER_ADDR")):
        told = " ".join(f"{k}={os.environ.get(k)}" for k in (*names, "MASTER_ADDR"))
        fail(
            f"{told}: not as torchrun sets them (0 <= RANK < WORLD_SIZE; LOCAL_RANK, MASTER_ADDR, "
            "MASTER_PORT): launch with torchrun, or unset them"
        )
    return rank, world, local


def on_signal(signum: int, frame: object) -> None:
    """While importing: one line and exit now. In run_main's main: SIGINT is a KeyboardInterrupt
    and SIGTERM a SystemExit(143), so `finally` blocks (temporary files) run before the line."""
    STATE["got"] = signum
    code, what = SIGNALS[signum]
    if not STATE["running"]:
        fail(what, code)
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise SystemExit(code)


def on_exit() -> None:
    """atexit, before Python's own last flush of stdout (a closed pipe or a full disk there was two
    lines and exit 120): one line `error: stdout: ...`, exit 1; none after another error's line."""
    try:
        sys.stdout.flush()
    except OSError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the bytes left go there
        if not STATE["said"]:
            say(f"stdout: {e}")
            sys.stderr.flush()
            os._exit(1)


def handle_signals() -> None:
    """Install `on_signal`, `on_uncaught`, `on_exit` (the scripts call it before their imports); a
    closed standard stream is /dev/null; stdout escapes what its encoding lacks (ascii)."""
    sys.excepthook = on_uncaught
    for signum in SIGNALS:
        signal.signal(signum, on_signal)
    for fd, name in enumerate(("stdin", "stdout", "stderr")):
        if getattr(sys, name) is None:  # /dev/null, not the next file opened; `fail` can say
            os.dup2(os.open(os.devnull, os.O_RDWR), fd)
            setattr(sys, name, open(fd, "w" if fd else "r", encoding="utf-8", closefd=False))
    sys.stdout.reconfigure(errors="backslashreplace")
    try:
        os.getcwd()
    except FileNotFoundError:  # MKL then failed to load torch's library, no `error:` line
        fail("the current folder was removed: cd into a folder that exists")
    if {"-h", "--help"} & set(sys.argv[1:]):  # the help runs nothing: no thread count to check
        os.environ.pop("OMP_NUM_THREADS", None)  # (before torch loads libgomp, which reads it)
    threads = os.environ.get("OMP_NUM_THREADS", "1")  # else libgomp's two lines, ignoring it
    if not all(n.strip().isdecimal() and int(n) > 0 for n in threads.split(",")):
        fail(f"OMP_NUM_THREADS={threads}: not a number of threads: set 1, 2, ..., or unset it")
    atexit.unregister(on_exit)  # once, though run_main calls this again
    atexit.register(on_exit)


def starting(command: str) -> None:
    """On a terminal (not a log or a pipe), one line at once, before the seconds importing torch."""
    if sys.stderr.isatty():
        print(f"{command}: starting (importing torch)...", file=sys.stderr, flush=True)


def one_line_warning(message: Warning | str, *args: Any, **kw: Any) -> None:
    """A warning as the scripts show it: one line `warning: ...`, each once (a batch's images share
    theirs; Python's own memory of what it showed is reset by every `catch_warnings`)."""
    if (line := f"warning: {one_line(message)}") not in SHOWN:
        SHOWN.add(line)
        print(line, file=sys.stderr)


def run_main(main: Callable[[], object]) -> None:
    """A script's entry point: warnings one line each; SIGINT and SIGTERM, after main's cleanup,
    one line `error: interrupted` / `terminated`, exit 130 / 143, even if their exception was
    swallowed on the way (in a `__del__` or a finaliser, where Python only prints it)."""
    if STATE["got"] is not None:  # while importing: its line is said, its SystemExit swallowed
        raise SystemExit(SIGNALS[STATE["got"]][0])
    handle_signals()
    warnings.showwarning = one_line_warning
    STATE["running"] = True
    try:
        main()
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except SystemExit as e:
        if e.code != 143 or STATE["got"] != signal.SIGTERM:
            raise
        fail("terminated", 143)
    if STATE["got"] is not None:
        fail(*reversed(SIGNALS[STATE["got"]]))
