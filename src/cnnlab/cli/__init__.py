"""Command line: thin commands that parse options and call the library.

Each module registers its commands on the one app and names its help panel (what a user is doing:
learn, train, look inside, use, scale out); the panels are then put in that order here, whatever
order the modules were imported in. Command modules import the library inside each command, so
`cnnlab --help` loads no torch.
"""
import atexit
import contextlib
import errno
import io
import os
import signal
import sys
import threading
from types import FrameType

import typer

from cnnlab.cli import datasets, explore, inspect, playground, sweep, training, use  # noqa: F401  (each registers)
from cnnlab.cli._app import PANELS, app
from cnnlab.text import OUTPUT_ERRORS


def panel_rank(entry: typer.models.CommandInfo | typer.models.TyperInfo) -> int:
    """Where a command's panel comes in `cnnlab --help` (every command names one)."""
    return PANELS.index(str(entry.rich_help_panel))


app.registered_commands.sort(key=panel_rank)  # stable sorts: each module's own order is kept in its panel
app.registered_groups.sort(key=panel_rank)


def main() -> None:
    """The `cnnlab` script: run the command, then leave without tearing the interpreter down."""
    open_closed_standard_streams()
    write_any_text()
    if not current_directory_exists():
        print("error: the current directory no longer exists (it was deleted): cd to one that does",
              file=sys.stderr)
        exit_now(2)
    stop_on_sigterm_as_on_ctrl_c()
    try:
        app()  # click's standalone mode: always ends in SystemExit
    except SystemExit as done:
        exit_now(TERMINATED_STATUS if terminated and done.code == INTERRUPTED_STATUS else done.code)
    except OSError as exc:
        if not output_failed(exc):
            raise
        exit_now(report_output_failure(exc))


INTERRUPTED_STATUS = 130  # 128 + SIGINT: how typer ends a command that Ctrl-C stopped
TERMINATED_STATUS = 143  # 128 + SIGTERM
terminated = False


def stop_on_sigterm_as_on_ctrl_c() -> None:
    """SIGTERM (`kill`, `timeout`, a service manager) stops a command the way Ctrl-C does, exit status 143.

    Left to its default, SIGTERM ended the process on the spot: `predict DIR --out` left its temporary file, and
    its decoding processes (which leave both signals to this one, `cnnlab.data.workers`) blocked for good on a
    queue nobody read. As KeyboardInterrupt in the main thread, every `finally` runs instead. Training
    (`engine.stop_on_signals`) and serving (uvicorn) set their own handlers while they run. A SIGTERM ignored
    by whoever started cnnlab stays ignored."""
    if threading.current_thread() is threading.main_thread() and \
            signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, interrupt_on_sigterm)


def interrupt_on_sigterm(signum: int, frame: FrameType | None) -> None:
    global terminated
    terminated = True
    raise KeyboardInterrupt


STANDARD_STREAMS = ("stdin", "stdout", "stderr")


def open_closed_standard_streams() -> None:
    """Give a closed standard descriptor (`cnnlab ... >&-`) the null device, before anything else is opened.

    Python makes sys.stdout None for a closed descriptor 1, which every writer must then guard against
    (`None.flush()` was the end of every command). Worse, the next file opened would get descriptor 1, and
    the decoding workers and torchrun's ranks would inherit it as their stdout: whatever they printed would
    land in a checkpoint or a metrics file. Output to a stream the user closed is dropped, as Python drops
    print() to a None stream.
    """
    for fd, name in enumerate(STANDARD_STREAMS):
        stream = getattr(sys, name)
        if descriptor_open(fd) and stream is not None and not stream.closed:
            continue
        if not descriptor_open(fd):
            null = os.open(os.devnull, os.O_RDWR)  # the lowest free number: fd itself, the lower ones are open
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
        # a stream closed in-process (not its descriptor) writes to the null device, not over what replaced it
        target = fd if stream is None else os.devnull
        setattr(sys, name, open(target, "r" if fd == 0 else "w", encoding="utf-8", closefd=target != fd))  # noqa: SIM115  (held for the process)


def write_any_text() -> None:
    """stdout and stderr write every name as the bytes it came from (`cnnlab.text.OUTPUT_ERRORS`)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=OUTPUT_ERRORS)


def descriptor_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def current_directory_exists() -> bool:
    """False when the working directory was deleted under the shell: every relative path would fail later,
    and torch cannot even be imported (MKL prints a fatal error about its own library and exits)."""
    try:
        os.getcwd()
    except FileNotFoundError:
        return False
    return True


# Errors of writing the command's own output (a file name would say it was some other file): a full disk or
# quota behind `> file`, a device error, or a reader that went away (`cnnlab ... | head`).
OUTPUT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EPIPE)


def output_failed(exc: OSError) -> bool:
    return exc.filename is None and exc.errno in OUTPUT_ERRNOS


def report_output_failure(exc: OSError) -> int:
    """One line on stderr for output that could not be written; the exit status. A closed pipe that cut a
    command short is no error to report (its reader has all it wanted), but the command did not finish."""
    if exc.errno == errno.EPIPE:
        return 1
    with contextlib.suppress(OSError, ValueError):
        print(f"error: cannot write the output: {exc.strerror or exc}", file=sys.stderr)
    return 2


def exit_now(code: int | str | None) -> None:
    """End the process as `sys.exit(code)` would, minus the module teardown.

    Tearing down torch's modules takes 0.4-0.9 s at the end of every `cnnlab train` (BENCHMARKS.md, "Start-up
    and data"), and nothing in it is ours: every file the command writes is closed (and renamed into place)
    before it returns. The exit handlers still run and the standard streams are flushed; with a thread still
    running (a server's, a tracker's) Python's own exit waits for it as usual.
    """
    if threading.active_count() > 1 or not hasattr(atexit, "_run_exitfuncs"):
        raise SystemExit(code)
    if isinstance(code, str):  # sys.exit("message"): printed, status 1
        print(code, file=sys.stderr)
    status = code if isinstance(code, int) else 0 if code is None else 1
    # The command is over: a late Ctrl-C or SIGTERM ends the process at once, with no traceback from whichever
    # exit handler it lands in (as a KeyboardInterrupt it printed one), and still breaks an exit that hangs
    signal.signal(signal.SIGINT, lambda signum, frame: os._exit(INTERRUPTED_STATUS))
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(TERMINATED_STATUS))
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:  # None: closed before Python started, and not by cnnlab's script
                stream.flush()
        except ValueError:  # closed
            pass
        except OSError as exc:  # the command is done; what it still had to say could not be written
            if exc.errno != errno.EPIPE:  # a reader that left (`| head`) had all it wanted: the status stands
                status = status or report_output_failure(exc)
    os._exit(status)
