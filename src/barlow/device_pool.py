"""One device per run when several runs share a node: `dvc queue start -j N` on an
N-GPU node, each queued experiment's stages on a GPU of their own.

The node's devices are named once, in the environment of whoever starts the runs:

    BARLOW_DEVICE_POOL=0,1,2,3    # the ids CUDA_VISIBLE_DEVICES takes: indices or UUIDs
    BARLOW_DEVICE_LOCKS=DIR       # optional; default <tempdir>/barlow-devices

A stage that computes on a device claims a free id from the pool before anything
touches CUDA: an exclusive, non-blocking ``flock`` on ``DIR/<id>.lock``, tried id
after id, held for the process's lifetime, then narrows CUDA_VISIBLE_DEVICES to that id
(its workers and children inherit it). The kernel drops the lock when the process
ends, however it ends, so a crashed run frees its device. When every id is held the
stage waits for one. Without BARLOW_DEVICE_POOL nothing is claimed and a stage uses
what it sees (barlow.machine).

Claims are made, not guessed from ranks or worker numbers: DVC's queue workers do not
say which worker they are, and a run started by hand beside the queue takes part too.
On a machine without GPUs the ids are names only (the tests' fake devices): the run
computes on the CPU and records the id it claimed.
"""

from __future__ import annotations

import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

from barlow.params import ConfigError

POOL = "BARLOW_DEVICE_POOL"
LOCKS = "BARLOW_DEVICE_LOCKS"
#: Set in the environment of a process that claimed a device (and so of its workers):
#: the id, which barlow.stage.open_live records in the stage's metrics.
CLAIMED = "BARLOW_DEVICE"

#: The open lock files of this process's claim; an open file keeps its flock.
_held: list[int] = []


def pool() -> list[str]:
    """The ids of BARLOW_DEVICE_POOL, in order; empty when it is unset."""
    ids = [i.strip() for i in os.environ.get(POOL, "").split(",") if i.strip()]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{POOL}={os.environ[POOL]}: an id is named twice")
    return ids


def lock_dir() -> Path:
    """Where the claims are: a folder every process sharing the node's devices sees."""
    return Path(os.environ.get(LOCKS) or Path(tempfile.gettempdir()) / "barlow-devices")


def try_claim(ids: list[str], locks: Path) -> str | None:
    """The first id of ``ids`` whose lock this process took, or None if all are held."""
    locks.mkdir(parents=True, exist_ok=True)
    for device in ids:
        fd = os.open(locks / f"{device}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        _held.append(fd)
        return device
    return None


def claim(name: str, poll_s: float = 1.0) -> str | None:
    """Claim a device of the pool for this process, waiting while all are held, and
    narrow CUDA_VISIBLE_DEVICES to it; return its id. None without a pool, or when this
    process claimed one already (a stage claims once)."""
    if _held:
        return os.environ[CLAIMED]
    ids = pool()
    if not ids:
        return None
    locks = lock_dir()
    device = try_claim(ids, locks)
    if device is None:
        print(f"{name}: every device of {POOL}={','.join(ids)} is in use; waiting for one",
              file=sys.stderr, flush=True)
        while device is None:
            time.sleep(poll_s)
            device = try_claim(ids, locks)
    os.environ["CUDA_VISIBLE_DEVICES"] = device
    os.environ[CLAIMED] = device
    print(f"{name}: on device {device} of {POOL}", flush=True)
    return device
