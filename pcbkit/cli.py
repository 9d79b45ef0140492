"""Top-level Click group and the CLI edge. Commands live one per module; heavy imports stay inside
command bodies.

`main` is the one place where exceptions become exit statuses: bad input (`PcbkitError`) and
environment errors (a full disk, a read-only or missing path, out of memory) print ONE line
`pcbkit: error: ...` and exit 2; Ctrl-C exits 130. A Python traceback is printed only for a bug
(any other exception), or for every error with `PCBKIT_DEBUG=1` in the environment or the global
`--debug` flag (for bug reports).
"""

from __future__ import annotations

import errno
import logging
import os
import sys
import traceback

import click

from pcb_analysis import __version__
from pcb_analysis.errors import PcbkitError
from pcbkit.cmd_calibrate import calibrate_cmd
from pcbkit.cmd_demo import demo_cmd
from pcbkit.cmd_dump_logits import dump_logits_cmd
from pcbkit.cmd_evaluate import evaluate_cmd
from pcbkit.cmd_plot_confusion import plot_confusion_cmd
from pcbkit.cmd_stats import stats_cmd
from pcbkit.cmd_study import study_cmd
from pcbkit.cmd_synth import synth_cmd
from pcbkit.cmd_train import train_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="pcbkit")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
@click.option("--debug", is_flag=True, help="Show Python tracebacks of errors (as PCBKIT_DEBUG=1 does).")
def cli(verbose: bool, debug: bool) -> None:
    """pcbkit: Pairwise Class Balance for long-tailed instance segmentation."""
    if debug:
        _STATE["debug"] = True
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )


cli.add_command(synth_cmd)
cli.add_command(evaluate_cmd)
cli.add_command(stats_cmd)
cli.add_command(plot_confusion_cmd)
cli.add_command(dump_logits_cmd)
cli.add_command(calibrate_cmd)
cli.add_command(train_cmd)
cli.add_command(study_cmd)
cli.add_command(demo_cmd)


_STATE = {"debug": False}  # set by the global --debug flag


def debug_enabled() -> bool:
    """Tracebacks wanted: `--debug` given, or PCBKIT_DEBUG set to anything but "", "0"."""
    return _STATE["debug"] or os.environ.get("PCBKIT_DEBUG", "") not in ("", "0")


def os_error_line(err: OSError) -> str:
    """One line for an OSError that reached the CLI edge: `<file>: <problem>`."""
    problem = "no space left on device" if err.errno == errno.ENOSPC else (err.strerror or str(err))
    return f"{err.filename}: {problem}" if err.filename is not None else problem


def torch_write_line(err: RuntimeError) -> str | None:
    """torch's file writer reports a failed write (e.g. a full disk, when given a path) as a
    RuntimeError from inline_container.cc that never names the disk; None for other errors."""
    text = str(err)
    if "inline_container" in text or "PytorchStreamWriter" in text:
        first = text.strip().splitlines()[0][:160] if text.strip() else ""
        return f"a file could not be written completely; is the disk full? (torch: {first})"
    return None


def _fail(line: str, code: int) -> None:
    if debug_enabled():
        traceback.print_exc()
    click.echo(f"pcbkit: {line}", err=True)
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input and environment errors become one line on stderr and exit
    status 2, never a traceback (unless debugging, see the module docstring)."""
    _STATE["debug"] = False
    try:
        cli.main(args=argv, prog_name="pcbkit", standalone_mode=False)
    except PcbkitError as err:
        _fail(f"error: {err}", 2)
    except click.exceptions.Abort as err:  # click turns a KeyboardInterrupt into Abort: unwrap it
        cause = err.__cause__
        if isinstance(cause, KeyboardInterrupt):
            _fail(str(cause) or "interrupted", int(getattr(cause, "exit_code", 130)))
        _fail("aborted", 130)
    except click.ClickException as err:
        if debug_enabled():
            traceback.print_exc()
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt as err:  # a subclass may carry its own one line and exit status
        _fail(str(err) or "interrupted", int(getattr(err, "exit_code", 130)))
    except OSError as err:
        _fail(f"error: {os_error_line(err)}", 2)
    except MemoryError:
        _fail("error: out of memory", 2)
    except RuntimeError as err:
        line = torch_write_line(err)
        if line is None:
            raise
        _fail(f"error: {line}", 2)
