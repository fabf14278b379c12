"""The node's shape (params ``machine:``) resolved against the node itself: how many
processes a stage starts here, how many host cores they share, and how many loader
threads each gets, decided once, before any process starts.

    threads = max(1, cores // devices)

An explicit value the node cannot honour is refused in one line naming the key: more
processes than GPUs on a GPU node (ranks would ask for devices that do not exist), more
cores than this process may run on (numba refuses a thread count above it, inside every
FFCV pipeline), or more processes than cores (each process needs one to feed it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from barlow.config import MachineConfig, require


@dataclass(frozen=True)
class Shape:
    """What a stage runs with on this node."""

    devices: int  # processes on this node
    cores: int  # host cores they share; the conversion's processes
    threads: int  # FFCV loader threads (and SVM fold processes) per process
    collective_timeout_s: float


def available_cores() -> int:
    """CPUs this process may run on (its affinity mask, which cgroup cpusets and
    SLURM's --cpus-per-task narrow), not the node's total."""
    return len(os.sched_getaffinity(0))


def visible_gpus() -> int:
    """CUDA devices this process sees (CUDA_VISIBLE_DEVICES applied); 0 on a CPU build."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve(cfg: MachineConfig, gpus: int, cores: int,
            launched_devices: int | None = None, section: str = "machine") -> Shape:
    """``cfg`` on a node with ``gpus`` visible GPUs and ``cores`` usable CPUs.

    ``launched_devices`` is the process count a launcher already chose (torchrun's
    LOCAL_WORLD_SIZE: the stage's own launch, or torchrun or srun started by hand on
    several nodes): a worker sizes its threads by the processes sharing its node."""
    if cfg.devices == "auto":
        devices = max(1, gpus)
    else:
        devices = cfg.devices
        if gpus:
            require(devices <= gpus, f"{section}.devices",
                    f"{devices} processes, but this node has {gpus} GPU(s) visible"
                    f" (-S {section}.devices=auto uses them all)")
    if cfg.cores == "auto":
        used = cores
    else:
        used = cfg.cores
        require(used <= cores, f"{section}.cores",
                f"{used}, but this process may run on {cores} CPU(s)"
                f" (-S {section}.cores=auto uses them all)")
    if launched_devices is not None:
        # The processes exist already: refusing them now would help no one.
        devices = launched_devices
    else:
        require(devices <= used, f"{section}.devices",
                f"{devices} processes need at least one core each; {section}.cores"
                f" gives {used}")
    return Shape(devices=devices, cores=used, threads=max(1, used // devices),
                 collective_timeout_s=cfg.collective_timeout_s)


def node_shape(cfg: MachineConfig) -> Shape:
    """``resolve`` on this node, from inside a stage (launcher or worker)."""
    local = os.environ.get("LOCAL_WORLD_SIZE")
    return resolve(cfg, visible_gpus(), available_cores(),
                   int(local) if local is not None else None)
