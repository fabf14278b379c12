"""What a killed run leaves behind: no file that looks valid, no stale file that
nothing removes, and no process that outlives it.

Files appear whole or not at all: each is written under ``partial_path(target)``, a
fixed hidden name beside the target, then renamed onto it (``written_whole``). The name
holds no process id, so a run killed mid-write (kill -9 runs no cleanup) leaves at most
one partial file per target, and the next run of the stage writes over that same name
and removes it. A write the file system refuses (a full disk, a read-only or vanished
folder) removes the partial file too, leaves the target as it was, and becomes a
``WriteRefused`` naming the file: one line from the stage, exit status 5.

A pre-empted run loses nothing: ``stop_requests`` turns the scheduler's warning signals
(SIGTERM, and SIGUSR1 that SLURM's ``--signal`` sends before the time limit) into a
flag the training loops read at the end of each step, where they checkpoint and stop
(barlow.train; barlow.evaluate's trainers, with barlow.eval_checkpoint).

A child that dies does not leave its parent waiting: ``waited_with_children`` runs work
that forks processes and waits on them blindly (FFCV's writer) while watching the
children, and turns the first one's death into an error.

Processes die with their parent: ``die_with_parent`` asks Linux (prctl
PR_SET_PDEATHSIG) to SIGKILL the calling process when its parent dies, however it dies
(SIGKILL included, which no handler in the parent can forward). The torchrun workers
call it (barlow.distributed.init); ``children_die_with_parent`` makes every process
forked afterwards call it too (FFCV's writer processes). Python's multiprocessing
resource tracker then follows by itself: it exits, unlinking the shared memory it
tracks, once the last process holding its pipe has gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import multiprocessing
import resource
import signal
import sys
import threading
from pathlib import Path
from typing import Callable, Iterator

from barlow.errors import ChildFailed, WriteRefused

#: The signals a scheduler sends to ask a job to stop: SIGTERM (pre-emption, scancel,
#: SLURM's time limit, Kubernetes) and SIGUSR1 (SLURM's `--signal=USR1@<seconds>`).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_hooked = False
_prctl_function = None


def _prctl():
    """libc's prctl, looked up once: a child forked from a threaded parent calls it
    without a dynamic-loader lookup (whose lock another thread may have held)."""
    global _prctl_function
    if _prctl_function is None:
        _prctl_function = ctypes.CDLL(None, use_errno=True).prctl
    return _prctl_function


def partial_path(path: str | Path) -> Path:
    """Where ``path`` is written before the rename that makes it appear."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


#: What the file system answers when it cannot take a file, whatever the code writing it:
#: no space (or quota), a read-only file system or folder, a vanished folder, a file
#: larger than the process may write (RLIMIT_FSIZE, the file system's own limit).
REFUSED_WRITES = {errno.ENOSPC: "no space left on the device",
                  errno.EDQUOT: "disk quota exceeded",
                  errno.EROFS: "read-only file system",
                  errno.EACCES: "permission denied (a read-only folder?)",
                  errno.EPERM: "operation not permitted",
                  errno.ENOENT: "its folder vanished",
                  errno.EFBIG: "file too large for this process or file system"}
_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def written_whole(path: str | Path,
                  needed_bytes: Callable[[], int] | None = None) -> Iterator[Path]:
    """Yield ``partial_path(path)`` to write; once the body is done, rename it onto
    ``path``. On any failure the partial file is removed and ``path`` left as it was; a
    refusal of the file system (REFUSED_WRITES) raises WriteRefused naming ``path``, and,
    on a full disk, the bytes the file needed (``needed_bytes()``, called only then;
    without it, those written before the refusal) and those free."""
    path = Path(path)
    tmp = partial_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as err:
        if err.errno not in REFUSED_WRITES or isinstance(err, WriteRefused):
            raise
        what = REFUSED_WRITES[err.errno]
        if err.errno in _FULL:
            what += _space(tmp, needed_bytes)
        raise WriteRefused(err.errno, f"{path}: cannot write: {what}") from None
    finally:
        with contextlib.suppress(OSError):  # a vanished or read-only folder has none
            tmp.unlink(missing_ok=True)


def _space(tmp: Path, needed_bytes: Callable[[], int] | None) -> str:
    """": needs N bytes, M free on FOLDER" for a write refused for want of space."""
    if needed_bytes is not None:
        need = f"needs {needed_bytes():,} bytes"
    else:
        written = tmp.stat().st_size if tmp.is_file() else 0
        need = f"{written:,} bytes written before the refusal"
    try:
        free = f", {shutil.disk_usage(tmp.parent).free:,} free on {tmp.parent}"
    except OSError:
        free = ""
    return f": {need}{free}"


def waited_with_children(work: Callable[[], None], output: Path, page_bytes: int,
                         poll_s: float = 0.2) -> None:
    """Run ``work``, which forks processes and waits for them, in a thread, while this
    one watches every child it forks; return when ``work`` does.

    FFCV's DatasetWriter waits for its writer processes by polling a counter that a dead
    writer never advances: a writer whose write the file system refuses (a full disk, a
    file-size limit) or that the kernel's OOM killer ends would leave the stage waiting
    forever. Here the first child that ends with a non-zero status before ``work``
    returns ends the wait: the other children are killed, and the death is raised as
    WriteRefused naming ``output`` when a write of ``page_bytes`` (the writer's unit)
    could not fit (``_refusal``), else as ChildFailed. The thread, still polling, is a
    daemon: it ends with the process."""
    failure: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as err:  # noqa: BLE001 — re-raised by the watching thread
            failure.append(err)

    thread = threading.Thread(target=run, name="watched-work", daemon=True)
    seen: dict[int, multiprocessing.process.BaseProcess] = {}
    thread.start()
    while thread.is_alive():
        thread.join(poll_s)
        # active_children forgets a child once it has ended: every one seen is kept.
        seen.update((child.pid, child) for child in multiprocessing.active_children())
        dead = [child for child in seen.values() if child.exitcode not in (None, 0)]
        if dead and thread.is_alive():
            for child in seen.values():
                if child.exitcode is None:
                    child.kill()
            raise _death(dead[0].exitcode, output, page_bytes)
    if failure:
        raise failure[0]


def _death(exitcode: int, output: Path, page_bytes: int) -> Exception:
    """The error for a child of the work writing ``output`` that ended with ``exitcode``
    (negative: killed by that signal)."""
    refusal = _refusal(output, page_bytes)
    if refusal is not None:
        return WriteRefused(refusal, f"{output}: cannot write: {REFUSED_WRITES[refusal]}")
    how = (f"was killed by {signal.Signals(-exitcode).name}" if exitcode < 0
           else f"exited with status {exitcode}")
    return ChildFailed(f"{output}: a writer process {how} (its traceback, if any, is above)")


def _refusal(output: Path, page_bytes: int) -> int | None:
    """ENOSPC when ``output``'s file system has fewer than ``page_bytes`` free, EFBIG
    when the file-size limit this process and its children share (RLIMIT_FSIZE: `ulimit
    -f`, a batch system's) leaves no room for ``page_bytes`` more of the partial file;
    else None. Children report their errno only in a traceback: this is what the parent
    can read."""
    partial = partial_path(output)
    try:
        if shutil.disk_usage(output.parent).free < page_bytes:
            return errno.ENOSPC
        size = partial.stat().st_size if partial.exists() else 0
    except OSError:
        return None
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and size + page_bytes > limit:
        return errno.EFBIG
    return None


def die_with_parent() -> None:
    """Have the kernel SIGKILL this process when its parent exits (Linux; a no-op
    elsewhere). The death signal is tied to the parent thread that created this
    process, which for torchrun's workers and FFCV's writers is the main thread."""
    if not sys.platform.startswith("linux"):
        return
    if _prctl()(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    # A parent that died before the call has already handed this process to init.
    if os.getppid() == 1:
        os._exit(1)


def children_die_with_parent() -> None:
    """From now on, every process forked from this one dies with it (idempotent)."""
    global _hooked
    if not _hooked and sys.platform.startswith("linux"):
        _prctl()
        os.register_at_fork(after_in_child=die_with_parent)
        _hooked = True


@contextlib.contextmanager
def stop_requests() -> Iterator[Callable[[], bool]]:
    """Within the block, `STOP_SIGNALS` only set a flag; yields the function that reads
    it. The previous handlers are restored on exit. Call from the main thread (Python
    runs signal handlers there)."""
    received: list[int] = []

    def note(signum: int, frame: object) -> None:
        received.append(signum)

    previous = {sig: signal.signal(sig, note) for sig in STOP_SIGNALS}
    try:
        yield lambda: bool(received)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
