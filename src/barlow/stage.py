"""What every stage does at its edge: the command-line options they share, and known
errors turned into one clear line and a non-zero exit instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Any, Iterator

import click

from barlow.checkpoint import CheckpointError
from barlow.distributed import DistEnv
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


class _Silent:
    """Stands in for dvclive's Live on ranks other than 0: every call does nothing."""

    step = 0

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


def open_live(live_dir: Path, env: DistEnv) -> Any:
    """dvclive's Live writing to ``live_dir`` on rank 0, a silent stand-in on the other
    ranks: a stage logs the same way on every rank and only rank 0 writes."""
    if not env.is_main:
        return _Silent()
    from dvclive import Live

    return Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
