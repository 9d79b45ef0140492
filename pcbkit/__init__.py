"""The `pcbkit` command-line interface (the design card's `cli/`)."""

from pcb_analysis import __version__

__all__ = ["__version__"]
