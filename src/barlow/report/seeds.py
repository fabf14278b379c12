"""Mean ± sample standard deviation over seeds, and this run's seed replicas: snapshots
that differ from it only in their seeds."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from barlow.report.inputs import flatten


@dataclass
class Stat:
    """Mean and sample standard deviation (n − 1) of one metric over N seeds."""

    mean: float
    std: float
    n: int
    values: tuple[float, ...] = ()   # one per seed, in run order (the figure's points)

    @classmethod
    def of(cls, values: Sequence[float]) -> Stat:
        """std is 0.0 for one value (undefined: text() prints "(1 seed)", no ±) and NaN
        when a value is NaN or infinite (statistics.stdev raises on those; one diverged
        seed must show in its row, not stop the report)."""
        if len(values) < 2:
            std = 0.0
        elif all(math.isfinite(v) for v in values):
            std = statistics.stdev(values)
        else:
            std = math.nan
        return cls(statistics.fmean(values), std, len(values), tuple(values))

    def text(self, digits: int = 1) -> str:
        if self.n == 1:
            return f"{self.mean:.{digits}f} (1 seed)"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f} (n={self.n})"


#: The baselines reported beside each Barlow Twins metric ("…/barlow/…" → "…/<name>/…").
BASELINES = ("random_init", "raw_pixels", "scratch")


#: Last parts of the params keys that say how a run executes or where its inputs lie,
#: not what it computes (data paths: the inputs' hashes are in the manifests).
#: colour_ops_on (augment): where the colour ops run, host or device, with the same
#: draws (within ±1 grey level in a rare pixel); snapshots made before the key existed
#: lack it, and ran them on the host. workers, nproc_per_node, svm_jobs and
#: collective_timeout_s: the per-stage keys of snapshots made before the machine
#: section held them.
OPERATIONAL = ("workers", "dir", "root", "nproc_per_node", "log_every_steps",
               "checkpoint_every_steps", "extract_batch_size", "eval_batch_size",
               "colour_ops_on", "svm_jobs", "collective_timeout_s")

#: Params sections that say on what a run executes (the node's processes and cores).
EXECUTION = ("machine",)

#: Keys that change what a run computes, added after runs were snapshotted
#: (reports/profiles) or queued (`dvc exp show`), each with the value those earlier
#: runs computed with: a run whose params lack one ran with it.
#: pretrain.grad_allreduce: every earlier snapshot pretrained in one process, where no
#: gradient is all-reduced, which is what fp32 gives too (and the path that made it
#: bf16 ran only on several GPUs).
IMPLIED = {"pretrain.grad_allreduce": "fp32"}


def with_implied(params: Mapping[str, Any]) -> dict[str, Any]:
    """Flattened ``params`` with the IMPLIED value of each key they lack."""
    return {**IMPLIED, **params}


#: Params sections that only say how results are presented, never what a run computes
#: (the report stage reads them after every other stage ran): a run queued from a commit
#: that added or changed one computes the same as one queued before it.
PRESENTATION = ("report",)


def is_operational(key: str) -> bool:
    """Whether the dotted params key ``key`` does not change what a run computes: one
    of the OPERATIONAL kind, or in an EXECUTION or PRESENTATION section."""
    return (key.rsplit(".", 1)[-1].endswith(OPERATIONAL)
            or key.split(".", 1)[0] in EXECUTION + PRESENTATION)


def is_seed_replica(this_params: Mapping[str, Any], profile: Mapping[str, Any]) -> bool:
    """A snapshot whose params differ from this run's in keys named ``seed`` and
    otherwise only in operational ones: the same experiment, another seed."""
    mine = with_implied(flatten(this_params, "."))
    theirs = with_implied(profile["params"])
    differ = {k for k in set(mine) | set(theirs)
              if mine.get(k) != theirs.get(k) and not is_operational(k)}
    return bool(differ) and all(k.rsplit(".", 1)[-1] == "seed" for k in differ)


def seed_rows(this_metrics: Mapping[str, float], replicas: Sequence[Mapping[str, Any]],
              metric_names: Sequence[str]) -> list[list[str]]:
    """Rows "metric | mean ± std (n) | each seed's value" over this run and its seed
    replicas, for METRIC_NAMES and, beside each Barlow Twins metric, its baselines
    (the same name with random_init, raw_pixels or scratch for barlow) where logged.
    std is the sample standard deviation (n − 1)."""
    runs = [this_metrics] + [r["metrics"] for r in replicas]
    names: list[str] = []
    for name in metric_names:
        baselines = ([name.replace("/barlow/", f"/{b}/") for b in BASELINES]
                     if "/barlow/" in name else [])
        # A baseline also named in METRIC_NAMES gets one row, beside its Barlow Twins one.
        names += [n for n in [name] + [b for b in baselines if b in this_metrics]
                  if n not in names]
    rows = []
    for name in names:
        values = [m[name] for m in runs if m.get(name) is not None]
        if values:
            rows.append([name, Stat.of(values).text()] + [f"{v:.2f}" for v in values])
    return rows
