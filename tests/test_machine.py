"""The machine section: one switch for the node's shape, resolved against the node
before any process starts (barlow.machine)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from barlow.config import ConfigError, MachineConfig, from_mapping, merge_params, read_params
from barlow.machine import Shape, available_cores, resolve
from conftest import REPO


def cfg(devices="auto", cores="auto", timeout=60.0) -> MachineConfig:
    return from_mapping(MachineConfig, {"devices": devices, "cores": cores,
                                        "collective_timeout_s": timeout}, "machine")


@pytest.mark.parametrize("devices, cores, gpus, node_cores, want", [
    ("auto", "auto", 0, 2, Shape(1, 2, 2, 60.0)),      # a CPU laptop: one process
    ("auto", "auto", 8, 64, Shape(8, 64, 8, 60.0)),    # an 8-GPU node
    ("auto", "auto", 1, 16, Shape(1, 16, 16, 60.0)),   # one GPU
    (1, "auto", 8, 64, Shape(1, 64, 64, 60.0)),        # one of eight GPUs
    (2, "auto", 0, 2, Shape(2, 2, 1, 60.0)),           # two gloo processes on a CPU
    (3, 8, 0, 16, Shape(3, 8, 2, 60.0)),               # threads round down
    (1, 1, 0, 2, Shape(1, 1, 1, 60.0)),
])
def test_threads_per_process_divide_the_cores(devices, cores, gpus, node_cores, want):
    assert resolve(cfg(devices, cores), gpus, node_cores) == want


@pytest.mark.parametrize("devices, cores, gpus, node_cores, message", [
    (8, "auto", 1, 16, "machine.devices: 8 processes, but this node has 1 GPU(s) visible"),
    ("auto", 12, 0, 2, "machine.cores: 12, but this process may run on 2 CPU(s)"),
    (4, "auto", 0, 2, "machine.devices: 4 processes need at least one core each;"
                      " machine.cores gives 2"),
    (2, 1, 0, 2, "machine.devices: 2 processes need at least one core each"),
])
def test_a_shape_the_node_cannot_honour_is_refused_naming_the_key(devices, cores, gpus,
                                                                 node_cores, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve(cfg(devices, cores), gpus, node_cores)


def test_processes_a_launcher_started_size_the_threads():
    """torchrun started by hand (several nodes): the processes exist; each takes its
    share of the cores, however few."""
    assert resolve(cfg(), 0, 2, launched_devices=2) == Shape(2, 2, 1, 60.0)
    assert resolve(cfg(1, 1), 0, 2, launched_devices=2) == Shape(2, 1, 1, 60.0)


@pytest.mark.parametrize("values, message", [
    ({"devices": 0}, "machine.devices: 0 must be >= 1 or auto"),
    ({"cores": "all"}, "machine.cores: 'all' is none of"),
    ({"devices": 1.5}, "machine.devices: 1.5 is none of"),
    ({"collective_timeout_s": 0.0}, "machine.collective_timeout_s: must be > 0"),
])
def test_bad_values_are_refused(values, message):
    mapping = {"devices": "auto", "cores": "auto", "collective_timeout_s": 60.0, **values}
    with pytest.raises(ConfigError, match=message):
        from_mapping(MachineConfig, mapping, "machine")


def paper_params() -> dict:
    """params.yaml with configs/paper.yaml applied, as its `-S` switch applies it."""
    return merge_params(read_params(REPO / "params.yaml"), read_params(REPO / "configs/paper.yaml"))


def test_the_paper_switch_uses_the_nodes_gpus_and_cores():
    """configs/paper.yaml asks for every GPU and core of the node, never a count: on this
    CPU machine one process with every core, on an 8-GPU node eight."""
    machine = from_mapping(MachineConfig, paper_params()["machine"], "machine")
    assert resolve(machine, 0, available_cores()).devices == 1
    assert resolve(machine, 8, 64) == Shape(8, 64, 8, 1800.0)


@pytest.mark.slow
@pytest.mark.parametrize("machine, message", [
    ({"cores": 4096}, "pretrain: error: params: machine.cores: 4096, but this process may"
                      " run on"),
    ({"devices": 4096}, "pretrain: error: params: machine.devices: 4096 processes need at"
                        " least one core each"),
])
def test_the_stage_stops_in_one_line_before_any_process(tmp_path, machine, message):
    """An impossible shape, with the paper switch's many-thread settings, stops the
    stage in one line and exit 2 before torchrun starts a process or a file is written."""
    params = merge_params(paper_params(), {"machine": machine})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [sys.executable, "-m", "stages.pretrain", "--params", str(tmp_path / "params.yaml"),
           "--data", str(tmp_path / "nodata"), "--out", str(tmp_path / "out"),
           "--live", str(tmp_path / "live")]
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(message), result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "live").exists()

