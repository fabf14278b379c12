"""Starting a stage's processes: one command that, with N > 1, runs N workers of itself
through torchrun's launcher, and passes a worker's one-line error back as one line.

Apart from barlow.distributed (the process group and every collective) because every
stage needs this at its edge, the conversion stages too, which must not depend on the
loss and the training code that barlow.distributed holds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import time
from typing import Collection, Sequence

import psutil

from barlow.interrupt import STOP_SIGNALS


#: Set by `launch` in its workers' environment (see `report_error`).
_LAUNCHED = "BARLOW_LAUNCHED_WORKER"


def launched_rank() -> int:
    """This process's rank as torchrun's environment gives it, 0 without torchrun;
    readable before (or without) `init`, e.g. to print progress on rank 0 only."""
    return int(os.environ.get("RANK", "0"))


def ranks_on_this_node() -> int:
    """How many of the run's processes share this node (torchrun's LOCAL_WORLD_SIZE),
    1 without torchrun."""
    return int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def under_torchrun() -> bool:
    """Whether torchrun (or another launcher setting its variables) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def joins_nodes() -> bool:
    """Whether this node's `launch` joins a run of several nodes: PET_NNODES is set, with
    PET_NODE_RANK, PET_MASTER_ADDR and PET_MASTER_PORT, torchrun's own environment form
    of its static rendezvous options (each option reads PET_<NAME>), as
    scripts/slurm/pretrain.sbatch sets them from SLURM's variables. Otherwise the
    node is a run of its own (torchrun's --standalone)."""
    return "PET_NNODES" in os.environ


def launch(module: str, args: Sequence[str], nproc_per_node: int,
           reported_exits: Collection[int]) -> int:
    """Run ``python -m module *args`` in ``nproc_per_node`` processes on this node, as
    ``torchrun --standalone --nproc_per_node=N -m module *args`` does; return 0 when
    every process succeeds. With `joins_nodes`, the processes are this node's share of
    a run of several nodes, whose rendezvous torchrun reads from PET_* instead.

    When the first process to fail exited with a status in ``reported_exits`` (an error
    it reported itself, in one line), return that status, without torchrun's failure
    report and its traceback. Any other failure (a crash, a kill) raises torchrun's
    ChildFailedError, whose report names the rank, the exit code or signal.

    `STOP_SIGNALS` sent to this process are passed on to the workers, and nothing
    more: they checkpoint and exit with their own status (barlow.train), which comes
    back as above. torchrun's agent would instead stop the workers itself, and SIGKILL
    any still writing after its shutdown timeout (30 s); SIGUSR1, which it does not
    handle by default, would end it at once, and its workers with it
    (barlow.interrupt.die_with_parent)."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    # The agent also logs each failure at ERROR level before raising; the exception's
    # report says the same, so a reported error stays one line.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    os.environ[_LAUNCHED] = "1"  # inherited by the workers: see report_error
    # torchrun's own default for several processes, set here so that it does not print
    # a four-line notice saying so.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    for sig in STOP_SIGNALS:
        signal.signal(sig, _pass_to_workers)
    # torchrun's default list, less SIGTERM: the handler above keeps it.
    parsed = get_args_parser().parse_args(
        [*([] if joins_nodes() else ["--standalone"]), f"--nproc_per_node={nproc_per_node}",
         "--signals_to_handle=SIGINT,SIGHUP,SIGQUIT", "-m", module, *args])
    try:
        run(parsed)
    except ChildFailedError as err:
        _, first = err.get_first_failure()
        if first.exitcode not in reported_exits:
            raise
        reported = first.error_file_data.get("message")
        if isinstance(reported, dict):  # else the worker printed it (click's usage errors)
            print(reported["message"], file=sys.stderr, flush=True)
        return first.exitcode
    return 0


def _pass_to_workers(signum: int, frame: object) -> None:
    """Send ``signum`` on to this launcher's workers: its child processes (torchrun
    starts each in a session of its own, so a signal to the launcher's group misses
    them). Before they exist nothing has trained: the signal then ends the launcher,
    as it would without this handler."""
    workers = psutil.Process().children()
    if not workers:
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)
    for worker in workers:
        with contextlib.suppress(psutil.NoSuchProcess):
            worker.send_signal(signum)


def report_error(line: str) -> None:
    """Hand a one-line error report to the `launch` that started this worker, which
    prints the first failing rank's line once (every rank usually meets the same bad
    input); print it on stderr when `launch` did not start this process.

    The line goes into torchrun's per-worker error file (TORCHELASTIC_ERROR_FILE), in
    the layout its ErrorHandler writes, which the launcher reads back on failure."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE") if os.environ.get(_LAUNCHED) else None
    if not path:
        print(line, file=sys.stderr, flush=True)
        return
    report = {"message": line, "extraInfo": {"timestamp": str(int(time.time()))}}
    with open(path, "w") as f:
        json.dump({"message": report}, f)
