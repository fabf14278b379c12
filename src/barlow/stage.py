"""What every stage does at its edge: the command-line options they share, and known
errors turned into one clear line and a non-zero exit instead of a traceback.

Exit statuses: 0 done; 2 bad input (params, data, a checkpoint from other params),
reported in one line; 3 a fault mid-run the stage reported in one line (a non-finite
loss, a run that took no optimisation step, a process it started that died); 4
pre-empted: stopped on SIGTERM or SIGUSR1 after writing its checkpoint, in one line, and
the next run resumes (pretrain, semisup, linear, transfer); 5 the
file system refused an output (no space left, a read-only or vanished folder, a
file-size limit), reported in one line naming the file, an earlier version of it intact;
6 stopped because another rank of the process group failed (barlow.distributed's
failure watch), in one line naming that rank and its reason; anything else is a crash,
with its traceback. A rank that fails (a reported error or a crash) tells the others
before it exits, so every rank on every node ends within seconds."""

from __future__ import annotations

import contextlib
import errno
import functools
import math
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NoReturn, Sequence

import click

from barlow import launch
from barlow.errors import PEER_FAILED, BadInput, ChildFailed, Preempted, WriteRefused

if TYPE_CHECKING:
    from barlow.distributed import DistEnv
    from barlow.machine import Shape


params_option = click.option("--params", default="params.yaml", show_default=True,
                             help="the params file the stage reads its sections from")
data_option = click.option(
    "--data", "data_dir", required=True, type=click.Path(path_type=Path),
    help="folder with train.beton and test.beton (the convert stage's output)")
live_option = click.option("--live", "live_dir", required=True, type=click.Path(path_type=Path),
                           help="dvclive folder (metrics.json, plots/)")
_weights_help = ("backbone state dict in torchvision layout: the pretrain stage's backbone.pt,"
                 " or the official Barlow Twins resnet50.pth (with model.arch: resnet50)")


def backbone_or_baselines(command: Any) -> Any:
    """The evaluation stages' choice of what they evaluate: ``--weights PATH`` (the
    Barlow backbone alone: a DVC stage that reruns with every pretraining) or
    ``--baselines`` (the baselines of the stage's params section alone, which read no
    weights: a DVC stage of their own that pretraining never reruns). Exactly one,
    checked before the stage reads anything: neither or both is a usage error (exit 2).
    The command receives ``weights`` alone: None means the baselines."""

    @functools.wraps(command)
    def checked(*args: Any, weights: Path | None, baselines: bool, **kwargs: Any) -> Any:
        if (weights is None) == (not baselines):
            raise click.UsageError("give exactly one of --weights PATH (the backbone) or"
                                   " --baselines")
        return command(*args, weights=weights, **kwargs)

    checked = click.option(
        "--baselines", is_flag=True,
        help="evaluate the baselines of the stage's params section instead of a backbone"
             " (no weights read)")(checked)
    return click.option("--weights", type=click.Path(path_type=Path), default=None,
                        help=f"evaluate this backbone: {_weights_help}")(checked)


def evaluated(weights: Path | None, baselines: Sequence[str]) -> tuple[str, ...]:
    """What a stage of `backbone_or_baselines` evaluates: ("barlow",) with --weights,
    else the ``baselines`` of its params section (possibly none)."""
    return ("barlow",) if weights is not None else tuple(baselines)


def write_no_evaluations(live_dir: Path) -> None:
    """What --baselines writes when its params list no baseline: the outputs the
    stage's dvc.yaml entry declares, LIVE/metrics.json holding ``{}`` and an empty
    LIVE/plots/metrics, so that the stage succeeds (exit 0) without a probe, and a
    report reads no baseline figures from it."""
    from dvclive import Live

    Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None).end()
    (live_dir / "plots" / "metrics").mkdir(parents=True, exist_ok=True)


BAD_INPUT = 2
FAULT = 3
PREEMPTED = 4
WRITE_REFUSED = 5
#: Statuses the stage reported itself: a launcher passes them on unchanged.
REPORTED_EXITS = (BAD_INPUT, FAULT, PREEMPTED, WRITE_REFUSED, PEER_FAILED)
#: Errors that only a write meets, whoever writes (dvclive's metrics, matplotlib's
#: figures): reported as WriteRefused is. A missing file or a denied permission can be
#: a read's, and stays a crash outside barlow.interrupt.written_whole.
_WRITE_ONLY_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


class NonFiniteMetric(RuntimeError):
    """A figure about to be logged is NaN or Inf: the run diverged, and its metrics are
    not results."""


def numba_finalizer_error(args: Any) -> bool:
    """Whether an unraisable error (sys.unraisablehook's ``args``) is the KeyError that
    numba's dispatcher finalizer (numba/core/dispatcher.py) raises when the garbage
    collector frees a compiled FFCV pipeline mid-run: the finalizer only releases
    compiled code, which no result depends on, and its traceback reads like a failure."""
    tb = args.exc_traceback
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb is not None else None
    return (isinstance(args.exc_value, KeyError) and code is not None
            and code.co_name == "finalizer"
            and Path(code.co_filename).parts[-3:] == ("numba", "core", "dispatcher.py"))


def _unraisable(args: Any) -> None:
    """The stages' sys.unraisablehook: Python's own, less `numba_finalizer_error`."""
    if not numba_finalizer_error(args):
        sys.__unraisablehook__(args)


@contextlib.contextmanager
def run_stage(name: str) -> Iterator[None]:
    """Run a stage body; a BadInput (ConfigError, DataError, CheckpointError) exits with
    status 2 and its message, a NonFiniteMetric with status 3 (a fault mid-run), a
    Preempted with status 4 and its message from rank 0 (every rank stops alike), a
    write the file system refused with status 5 (module docstring). A crash is told
    to the other ranks (`tell_other_ranks`), then raised. From here to the process's
    end, the unraisable errors go to `_unraisable`."""
    sys.unraisablehook = _unraisable
    try:
        yield
    except BadInput as err:
        fail(name, err, BAD_INPUT)
    except (NonFiniteMetric, ChildFailed) as err:
        fail(name, err, FAULT)
    except Preempted as stop:
        if launch.launched_rank() == 0:
            print(f"{name}: {stop}", file=sys.stderr, flush=True)
        sys.exit(PREEMPTED)
    except WriteRefused as err:
        fail(name, err, WRITE_REFUSED)
    except OSError as err:
        if err.errno not in _WRITE_ONLY_ERRNOS:
            raise
        fail(name, f"{err.filename or 'an output'}: cannot write: {err.strerror}",
             WRITE_REFUSED)
    except Exception as err:
        tell_other_ranks(name, f"{type(err).__name__}: {err}")
        raise


def fail(name: str, err: object, status: int) -> NoReturn:
    """Report ``name: error: err`` in one line on stderr, tell the other ranks
    (`tell_other_ranks`) and exit with ``status``. A worker of barlow.launch.launch
    hands the line to the launcher instead, which prints the first failing rank's once
    for all."""
    launch.report_error(f"{name}: error: {err}")
    tell_other_ranks(name, str(err))
    sys.exit(status)


def tell_other_ranks(name: str, reason: str) -> None:
    """Record this rank's failure for the other ranks of its process group
    (barlow.distributed.report_failure), which then stop with status 6. A process
    that never imported barlow.distributed joined no group: the conversion stages
    leave it out of their imports and their dvc.yaml deps."""
    distributed = sys.modules.get("barlow.distributed")
    if distributed is not None:
        distributed.report_failure(name, reason)


def machine_shape(params: str | Path, device: str | None = None) -> Shape:
    """The params' ``machine:`` section resolved on this node (barlow.machine): checked
    before any process starts, so a value the node cannot honour is one line.

    ``device``: the name of a stage that computes on a device. Under a device pool
    (barlow.device_pool) it first claims one, before anything touches CUDA, for this
    process and the workers it starts; torchrun's workers use their launcher's."""
    from barlow.config import MachineConfig, load_section, require
    from barlow.machine import node_shape

    cfg = load_section(MachineConfig, "machine", params)
    if device is not None and not launch.under_torchrun():
        from barlow import device_pool

        if device_pool.claim(device) is not None:
            require(cfg.devices in ("auto", 1), "machine.devices",
                    f"{cfg.devices}, but {device_pool.POOL} gives each run one device")
    return node_shape(cfg)


def run_in_workers(module: str, nproc_per_node: int) -> None:
    """Started by hand or by DVC (not by torchrun) with ``nproc_per_node`` > 1: run this
    same command, with the same options, in that many processes through torchrun's
    launcher (barlow.launch.launch), and exit with their status: a worker's
    reported error comes back as its one line and its status (2 or 3), a crash with
    torchrun's report; on a node of several (`barlow.launch.joins_nodes`, the SLURM
    script's), with 1 process too. Otherwise return at once: this process is the (only)
    worker. Started by torchrun directly (several nodes), every process is a worker."""
    if (nproc_per_node <= 1 and not launch.joins_nodes()) or launch.under_torchrun():
        return
    ctx = click.get_current_context()
    args = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if not isinstance(param, click.Option) or value is None:
            continue
        if param.is_flag:  # --baselines: the option alone, when set
            args += [param.opts[0]] if value else []
        else:
            args += [param.opts[0], str(value)]
    sys.exit(launch.launch(module, args, nproc_per_node, REPORTED_EXITS))


class _Silent:
    """Stands in for dvclive's Live on ranks other than 0: every call does nothing."""

    step = 0

    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class _FiniteLive:
    """dvclive's Live that refuses a NaN or Inf metric: it raises NonFiniteMetric
    before writing the value and removes the metrics file written so far, so a
    diverged run leaves no metrics.json that looks like a result."""

    def __init__(self, live: Any):
        object.__setattr__(self, "_live", live)

    def log_metric(self, name: str, value: float, *args: Any, **kwargs: Any) -> None:
        if not math.isfinite(float(value)):
            Path(self._live.metrics_file).unlink(missing_ok=True)
            raise NonFiniteMetric(f"metric {name} is {value}; no metrics were kept")
        self._live.log_metric(name, value, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._live, name, value)


def open_live(live_dir: Path, env: DistEnv) -> Any:
    """dvclive's Live writing to ``live_dir`` on rank 0 (refusing non-finite metrics,
    `_FiniteLive`), a silent stand-in on the other ranks: a stage logs the same way on
    every rank and only rank 0 writes."""
    if not env.is_main:
        return _Silent()
    from dvclive import Live

    from barlow.device_pool import CLAIMED

    live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False, report=None)
    if CLAIMED in os.environ:
        # The pool's device this run claimed, a name (an index or a UUID), written with
        # the metrics so that `dvc exp show` lists each experiment's.
        live.summary["device"] = os.environ[CLAIMED]
    return _FiniteLive(live)
