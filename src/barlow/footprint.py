"""What the evaluations' gathered features weigh on each rank, checked before any long
work.

The linear and transfer stages extract features in shares and all-gather them
(barlow.probe.gathered_features): every rank then holds a whole split's rows, and the
heads move them to the device (barlow.evaluate). Per embedding the splits it gathers are
held together, so with R rows over those splits and D features per row

    bytes = R · D · 4                  (float32, on every rank)

on the host once per rank of the node, and once more on each rank's GPU (figures at
the paper's scale: docs/multi-gpu.md). `check_fits` refuses, in one line naming the
params key, a configuration whose bytes exceed the memory available now; it is a floor:
the heads' copies and the SVMs' float64 features come on top.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import psutil
import torch

from barlow import distributed as dist
from barlow.config import ModelConfig, require
from barlow.launch import ranks_on_this_node
from barlow.models import build_backbone

FLOAT32_BYTES = 4


def feature_dim(name: str, model: ModelConfig, resolution: int) -> int:
    """D of embedding ``name`` (barlow.probe.embedding): 3·r² for raw_pixels at input
    resolution r, else the backbone's feature width (whatever the resolution: the
    backbones end in a global pool)."""
    if name == "raw_pixels":
        return 3 * resolution * resolution
    # On the meta device: shapes only, so no weights are allocated or initialised and
    # the global RNG the random-init baseline is seeded from is left as it was.
    with torch.device("meta"):
        return build_backbone(model.arch, model.width, model.layers)[1]


@dataclass(frozen=True)
class Gathered:
    """The splits one embedding gathers and holds together on every rank, and the params
    key and value that ask for them (a baseline: linear.baselines, raw_pixels)."""

    key: str
    value: str
    rows: dict[str, int]   # split name -> rows
    dim: int

    @property
    def bytes(self) -> int:
        """Σ rows · D · 4."""
        return sum(self.rows.values()) * self.dim * FLOAT32_BYTES


def per_embedding(names: Sequence[str], rows: dict[str, int], section: str,
                  barlow_key: tuple[str, str], model: ModelConfig,
                  resolution: int) -> list[Gathered]:
    """What each embedding of ``names`` gathers (``rows`` per split): the baselines keyed
    by ``section``.baselines, the pretrained backbone by ``barlow_key`` (what makes the
    stage gather those splits)."""
    return [Gathered(*(barlow_key if name == "barlow" else (f"{section}.baselines", name)),
                     rows, feature_dim(name, model, resolution)) for name in names]


def _gb(n: int) -> str:
    return f"{n / 1e9:,.1f} GB"


def refusal(gathered: Gathered, ranks_on_node: int, host_available: int,
            device_free: int | None) -> str | None:
    """Why ``gathered`` cannot be held (the message, without the key), or None: its bytes
    × the node's ranks above ``host_available``, or its bytes above ``device_free`` (the
    rank's GPU; None on the CPU)."""
    splits = " + ".join(f"{rows:,} {split}" for split, rows in gathered.rows.items())
    what = (f"{gathered.value} gathers {splits} rows × {gathered.dim:,} float32 features"
            f" on every rank: {_gb(gathered.bytes)}")
    if gathered.bytes * ranks_on_node > host_available:
        return (f"{what}, × {ranks_on_node} rank(s) on this node ="
                f" {_gb(gathered.bytes * ranks_on_node)}, more than the"
                f" {_gb(host_available)} of host memory available")
    if device_free is not None and gathered.bytes > device_free:
        return f"{what}, more than the {_gb(device_free)} free on the GPU"
    return None


def check_fits(gathered: Sequence[Gathered], device: torch.device) -> None:
    """Raise ConfigError (exit 2) naming the first of ``gathered`` that `refusal`
    refuses on any rank, with the memory available now on the host
    (psutil.virtual_memory().available) and on ``device`` (torch.cuda.mem_get_info);
    every rank raises the same line, so none waits in a collective."""
    host = psutil.virtual_memory().available
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    local = ranks_on_this_node()
    mine = next(((g.key, reason) for g in gathered
                 if (reason := refusal(g, local, host, free))), None)
    first = next((seen for seen in dist.all_objects(mine) if seen), None)
    if first is not None:
        require(False, *first)
