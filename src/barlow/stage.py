"""What every stage does at its edge: the command-line options they share, and known
errors turned into one clear line and a non-zero exit instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import click

from barlow.checkpoint import CheckpointError
from barlow.config import ConfigError
from barlow.data.sources import DataError


params_option = click.option("--params", default="params.yaml", show_default=True,
                             help="the params file the stage reads its sections from")
data_option = click.option(
    "--data", "data_dir", required=True, type=click.Path(path_type=Path),
    help="folder with train.beton and test.beton (the convert stage's output)")
weights_option = click.option(
    "--weights", required=True, type=click.Path(path_type=Path),
    help="backbone state dict in torchvision layout: the pretrain stage's backbone.pt, or "
         "the official Barlow Twins resnet50.pth (with model.arch: resnet50)")
live_option = click.option("--live", "live_dir", required=True, type=click.Path(path_type=Path),
                           help="dvclive folder (metrics.json, plots/)")


@contextlib.contextmanager
def run_stage(name: str) -> Iterator[None]:
    """Run a stage body; ConfigError/DataError/CheckpointError exit with status 2 and
    the message."""
    try:
        yield
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
