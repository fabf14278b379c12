"""What every stage does at its edge: turn known errors into one clear line and a
non-zero exit instead of a traceback."""

from __future__ import annotations

import contextlib
import sys
from typing import Iterator

from barlow.checkpoint import CheckpointError
from barlow.config import ConfigError
from barlow.data.sources import DataError


@contextlib.contextmanager
def run_stage(name: str) -> Iterator[None]:
    """Run a stage body; ConfigError/DataError/CheckpointError exit with status 2 and
    the message."""
    try:
        yield
    except (ConfigError, DataError, CheckpointError) as err:
        print(f"{name}: error: {err}", file=sys.stderr)
        sys.exit(2)
