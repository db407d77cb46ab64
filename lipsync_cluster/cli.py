"""The ``lipsync-cluster`` command. Each subcommand lives beside the code it drives."""
from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="lipsync-cluster")
def main() -> None:
    """Serve many lip-sync avatars to many viewers from a pool of workers.

    \b
    Quick start (CPU, demo models):
      lipsync-cluster demo-models demo_models --count 3 --kind light
      lipsync-cluster start --config demo_models/cluster.yaml --gpus 0 --per-gpu 2
      lipsync-cluster models
    """


def _register() -> None:
    # Subcommands are defined next to what they drive; importing here keeps `cli` on top of the
    # dependency graph.
    from .demo.cli import demo_models

    main.add_command(demo_models)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
