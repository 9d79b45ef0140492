"""Top-level Click group. Commands live one per module; heavy imports stay inside command bodies."""

from __future__ import annotations

import logging
import sys

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
def cli(verbose: bool) -> None:
    """pcbkit: Pairwise Class Balance for long-tailed instance segmentation."""
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


def main(argv: list[str] | None = None) -> None:
    """Console entry point: bad input becomes one line on stderr and exit status 2, never a traceback."""
    try:
        cli.main(args=argv, prog_name="pcbkit", standalone_mode=False)
    except PcbkitError as err:
        click.echo(f"pcbkit: error: {err}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        click.echo("pcbkit: aborted", err=True)
        sys.exit(130)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        click.echo("pcbkit: interrupted", err=True)
        sys.exit(130)
