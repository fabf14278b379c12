"""The errors a stage reports in one line instead of a traceback (barlow.stage): a bad
input, named (exit status 2), as opposed to a crash; and a write the machine refused
(exit status 5). Each module raises its own kind of bad input
(barlow.config.ConfigError, barlow.data.sources.DataError,
barlow.checkpoint.CheckpointError); the stage's edge needs to know only the base.
Beside them, `Preempted`: a run that stopped when asked to, which is no error; and
`ChildFailed`: a process the stage started died (exit status 3); and `PEER_FAILED`, the
status of a rank that another rank's failure ended.
"""

#: Exit status of a rank stopped because another rank of its group failed
#: (barlow.distributed.report_failure); barlow.stage lists every status.
PEER_FAILED = 6


class BadInput(ValueError):
    """A params value, data file or weights file the run cannot use; the message names
    it and says why."""


class Preempted(Exception):
    """A run stopped on a scheduler's request (barlow.interrupt.stop_requests) after
    writing its checkpoint; the next run resumes from it. Not a failure of the run: the
    stage exits with its own status (barlow.stage.PREEMPTED)."""


class WriteRefused(OSError):
    """The file system refused to take an output whole (no space left, a read-only or
    vanished folder, a file-size limit); the message names the file and, for a full
    disk, the bytes the file needed. Nothing was renamed into place: an earlier
    version of the file is intact."""

    def __str__(self) -> str:
        return self.strerror


class ChildFailed(RuntimeError):
    """A process the stage started died before its work was done (killed by the kernel,
    or its own crash, whose traceback it printed); the message names what it wrote."""
