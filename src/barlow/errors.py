"""The base of every error a stage reports in one line and exit status 2 (barlow.stage):
a bad input, named, as opposed to a crash. Each module raises its own kind
(barlow.config.ConfigError, barlow.data.sources.DataError,
barlow.checkpoint.CheckpointError); the stage's edge needs to know only this one.
Beside it, `Preempted`: a run that stopped when asked to, which is no error.
"""


class BadInput(ValueError):
    """A params value, data file or weights file the run cannot use; the message names
    it and says why."""


class Preempted(Exception):
    """A run stopped on a scheduler's request (barlow.interrupt.stop_requests) after
    writing its checkpoint; the next run resumes from it. Not a failure of the run: the
    stage exits with its own status (barlow.stage.PREEMPTED)."""
