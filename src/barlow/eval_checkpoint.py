"""An evaluation stage's checkpoint: the sub-runs it completed and the trainer state of
the one a stop interrupted, so that the next run of the stage skips the first and
resumes the second (barlow.evaluate.Preemption).

Sub-runs: the semisup stage's fine-tunings (each subset × barlow, scratch), the linear
stage's probes (barlow and each baseline), the transfer stage's evaluations (each set ×
embedding: its probe and SVMs, which resume only whole). A completed sub-run is kept as the rows and
figures it logged, which the next run logs again in the same order, so its dvclive
metrics and curves equal those of a run never stopped.

Written by rank 0 alone, atomically (barlow.checkpoint.save_atomic), and only when the
stage stops on request; deleted once the stage has written its metrics. It lives in the
stage's dvclive folder (LIVE/checkpoint.pt), beside the metrics it completes, and is
no DVC output: DVC neither caches it nor removes it before the stage reruns, which is
what lets `dvc repro` resume, and a finished stage leaves none behind (git ignores it
in the meantime). Rank 0 reads it (barlow.checkpoint.load_resumable: an interrupted run
of other params, data, weights or process count is refused in one line) and sends it
to every rank, so the other ranks need not see the file.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Callable, NoReturn

import numpy as np

from barlow import distributed as dist
from barlow.checkpoint import CheckpointError, code_hashes, load_resumable, save_atomic
from barlow.config import fingerprint
from barlow.data.sources import hash_file
from barlow.errors import Preempted
from barlow.evaluate import Preemption


def identity(*parts: np.ndarray | Path) -> str:
    """sha256 of index arrays and files, in order: the splits and weights a run used."""
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, Path):
            hash_file(part, digest)
        else:
            digest.update(np.asarray(part, dtype=np.int64).tobytes())
    return digest.hexdigest()


class EvalCheckpoint:
    """The checkpoint of stage ``stage`` at ``path``: ``config`` is what a stopped run
    must share with this one to be resumed (the stage's params, its data, splits and
    weights (`identity`), the world size); ``stop_requested`` the flag of
    barlow.interrupt.stop_requests. Construct on every rank."""

    def __init__(self, path: Path, stage: str, config: dict[str, Any], env: dist.DistEnv,
                 stop_requested: Callable[[], bool]):
        self.path, self.stage, self.config, self.env = path, stage, config, env
        self.stop_requested = stop_requested
        self.code = code_hashes()
        ckpt, problem = None, None
        if env.is_main:
            try:
                ckpt = load_resumable(path, config, self.code,
                                      log=lambda line: print(f"{stage}: {line}", flush=True),
                                      what=f"a {stage} checkpoint of this project")
            except CheckpointError as err:
                problem = str(err)
        # Rank 0's decision, and a refusal, reach every rank alike.
        ckpt, problem = dist.broadcast_object((ckpt, problem))
        if problem:
            raise CheckpointError(problem)
        #: Completed sub-runs: name -> what the stage recorded (`complete`).
        self.done: dict[str, Any] = dict(ckpt["done"]) if ckpt else {}
        self._current = ckpt["current"] if ckpt else None
        if ckpt and env.is_main:
            under_way = f", {self._current['run']} resumes" if self._current else ""
            print(f"{stage}: resumed from {path}: {len(self.done)} run(s) done{under_way}",
                  flush=True)

    def complete(self, run: str, record: dict[str, Any]) -> None:
        """Record sub-run ``run`` as done, ``record`` what the stage logs again for it."""
        self.done[run] = record

    def preemption(self, run: str) -> Preemption:
        """The trainer's Preemption for sub-run ``run``: resuming its stopped state, if
        the checkpoint holds one."""
        current = self._current
        start = current["state"] if current and current["run"] == run else None
        return Preemption(self.stop_requested, lambda state, where: self.stop(run, state, where),
                          start)

    def stop_if_requested(self, run: str) -> None:
        """Before sub-run ``run`` starts: stop there if any rank was asked to (one
        all-reduce), keeping the sub-runs done."""
        if dist.any_rank(self.stop_requested()):
            self.stop(run, None, "its start")

    def stop(self, run: str, state: dict[str, Any] | None, where: str) -> NoReturn:
        """Write the checkpoint (rank 0) with the sub-runs done and ``run``'s trainer
        ``state`` (None: ``run`` starts over), and raise Preempted on every rank."""
        if self.env.is_main:
            save_atomic({"config": self.config, "fingerprint": fingerprint(self.config),
                         "code": self.code, "finished": False, "done": self.done,
                         "current": None if state is None else {"run": run, "state": state}},
                        self.path)
        dist.barrier()  # no rank leaves (and no launcher reaps it) before the file exists
        raise Preempted(f"stopped on request in {self.stage}/{run} at {where}; {self.path}"
                        " holds it, the next run resumes there")

    def finish(self) -> None:
        """The stage wrote its metrics: the checkpoint has served (rank 0 deletes it)."""
        if self.env.is_main:
            self.path.unlink(missing_ok=True)
