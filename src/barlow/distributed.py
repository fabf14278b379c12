"""Everything that touches torch.distributed, so the rest of the library stays testable
in one CPU process.

One code path serves 1 CPU process, N CPU processes (gloo) and N GPUs (nccl): `init`
reads torchrun's environment and every helper here is the identity when no process
group exists. Cross-rank reductions that feed the loss go through the functional
collectives (``torch.distributed._functional_collectives``), whose backward is
registered with autograd for every backend (all_gather ↔ reduce_scatter, all_reduce ↔
all_reduce, all_to_all ↔ the reverse all_to_all); the older
``torch.distributed.nn.functional`` wrappers do the same but are deprecated.

A failure on one rank ends every rank within seconds (`report_failure`,
`FailureWatch`): the rank that fails records its reason in the group's key-value
store (the c10d store torchrun's agent hosts) before it exits, and every rank polls
that key from a daemon thread, once a second, leaving at once when it appears. A
collective waits for a dead peer until the collective timeout (NCCL does not notice
one), and torchrun's agent stops only the failed rank's siblings on its own node.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.parallel import DistributedDataParallel

from barlow.errors import PEER_FAILED, Preempted
from barlow.interrupt import die_with_parent
from barlow.launch import report_error, under_torchrun
from barlow.loss import (NORMALIZATIONS, LossTerms, Normalization, Variant, barlow_twins_loss,
                         combine, normalize, standardize)


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its ranks, the world size and the device it computes on."""

    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes metrics, checkpoints and logs."""
        return self.rank == 0


def init(timeout_s: float, backend: str | None = None) -> DistEnv:
    """Join the process group that torchrun describes, or run alone without one.

    Without torchrun's RANK/WORLD_SIZE variables: one process, no process group,
    device cuda:0 when CUDA is available, else cpu. With them: ``backend`` defaults
    to nccl when CUDA is available (device cuda:LOCAL_RANK) and gloo otherwise;
    passing "gloo" explicitly keeps the process on the CPU even where GPUs exist.
    ``timeout_s`` (machine.collective_timeout_s) bounds every collective, so a dead
    peer raises instead of hanging.
    """
    if not under_torchrun():
        device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
        return DistEnv(rank=0, local_rank=0, world_size=1, device=device)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        # torchrun starts each worker in a session of its own: a launcher killed by
        # SIGKILL could not stop it, and it would train on, orphaned.
        die_with_parent()
    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        # NCCL binds each process to the current device; set it before the group exists.
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    global _watch
    _watch = FailureWatch(dist.distributed_c10d._get_default_store(), rank, world_size)
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world_size, device=device)


#: Where a failed rank records "<stage>\t<rank>\t<reason>", and where each rank counts
#: itself once it has seen a failure or reported one (the group's store).
_FAILURE_KEY, _SEEN_KEY = "barlow/failure", "barlow/failure_seen"


class FailureWatch:
    """This rank's part in ending every rank when one fails (module docstring).

    A daemon thread polls ``store`` for `_FAILURE_KEY` every ``interval_s``. Seeing
    it, the thread prints ``<stage>: stopping: rank k failed: <reason>`` (through the
    launcher, as barlow.stage.fail does) and ends the process with status PEER_FAILED
    at once, whatever the main thread waits in. `report` records this rank's own
    failure. `stop` ends the thread (at `shutdown`; a normal exit never sets the key)
    and keeps the store for a `report` after the group is gone: a stage's error
    reaches its edge after the process group's ``finally``."""

    def __init__(self, store: dist.Store, rank: int, world_size: int,
                 interval_s: float = 1.0):
        self.store, self.rank, self.world_size = store, rank, world_size
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._poll, args=(interval_s,),
                                        name="barlow-failure-watch", daemon=True)
        self._thread.start()

    def _poll(self, interval_s: float) -> None:
        while not self._stopped.wait(interval_s):
            try:
                if not self.store.check([_FAILURE_KEY]):
                    continue
                stage, rank, reason = self.store.get(_FAILURE_KEY).decode().split("\t", 2)
                if self._stopped.is_set():  # this rank reported, or left the group
                    return
                self.store.add(_SEEN_KEY, 1)
            except Exception:  # noqa: BLE001 — the store's host ended: nothing to watch
                return
            report_error(f"{stage}: stopping: rank {rank} failed: {reason}")
            os._exit(PEER_FAILED)

    def report(self, stage: str, reason: str, wait_s: float = 10.0) -> None:
        """Record this rank's failure for every other rank's watch, then wait (at most
        ``wait_s``) until each has seen it or reported its own: the store lives in the
        agent of the first node, which may end as soon as its ranks have."""
        self.stop()
        with contextlib.suppress(Exception):  # a store already gone: no one to tell
            self.store.set(_FAILURE_KEY, f"{stage}\t{self.rank}\t{reason}")
            seen, deadline = self.store.add(_SEEN_KEY, 1), time.monotonic() + wait_s
            while seen < self.world_size and time.monotonic() < deadline:
                time.sleep(0.05)
                seen = self.store.add(_SEEN_KEY, 0)

    def stop(self) -> None:
        """End the polling thread; `report` still works."""
        self._stopped.set()
        if self._thread is not threading.current_thread():
            self._thread.join()


_watch: FailureWatch | None = None


def report_failure(stage: str, reason: str) -> None:
    """Tell every other rank of the group this process joined that it fails with
    ``reason`` (one line; a no-op without a group): they stop within seconds, with
    status PEER_FAILED, instead of waiting in a collective for this rank."""
    if _watch is not None:
        _watch.report(stage, " ".join(reason.split()))


@contextlib.contextmanager
def process_group(timeout_s: float) -> Iterator[DistEnv]:
    """`init` on entry and `shutdown` on exit, whatever ends the block: a stage's body
    under torchrun (or alone, without its variables)."""
    env = init(timeout_s=timeout_s)
    try:
        yield env
    finally:
        shutdown()


def shutdown() -> None:
    """Stop watching the process group for failures and leave it, if one was joined.

    Called while an error is on its way out of the stage (a `finally`), it leaves the
    group to the process's exit: barlow.stage reports the error to the other ranks
    first (`report_failure`), and they stop on that report, not on a connection this
    rank tore down (a gloo peer's crash, with a traceback)."""
    if _watch is not None:
        _watch.stop()
    leaving = sys.exc_info()[1]
    if _initialized() and (not isinstance(leaving, Exception) or isinstance(leaving, Preempted)):
        dist.destroy_process_group()


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    """Number of processes in the group; 1 without a process group."""
    return dist.get_world_size() if _initialized() else 1


def rank() -> int:
    """This process's rank in the group; 0 without a process group."""
    return dist.get_rank() if _initialized() else 0


def gather_with_grad(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0, in rank order, differentiably.

    The backward is a reduce-scatter with sum: rank r receives Σ_s ∂L_s/∂x_r, the sum
    over all ranks' losses of their gradient with respect to its own slice. Every rank
    must pass the same shape (drop the last incomplete batch).
    """
    if world_size() == 1:
        return x
    return funcol.all_gather_single(x.contiguous(), 0, dist.group.WORLD)


def all_reduce_sum_with_grad(x: Tensor) -> Tensor:
    """Σ over ranks of ``x``; backward sums the gradients over ranks likewise."""
    if world_size() == 1:
        return x
    return funcol.all_reduce(x, "sum", dist.group.WORLD)


def distributed_barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float,
                                  variant: Variant = "full",
                                  normalization: Normalization = "batch") -> LossTerms:
    """`barlow_twins_loss` of the GLOBAL batch (all ranks' rows), identical on every rank.

    One process: `barlow_twins_loss` itself. Several: `sharded_barlow_twins_loss`, for
    any dimension D and world size W (the feature blocks are padded when W ∤ D). It
    returns the same global terms and gives DDP the exact gradient (see its
    docstring), sending 0.14× the reference's bytes at paper scale (W=32) and 0.15×
    at W=24 (benchmarks/README.md). Every rank must pass the same local batch size
    (drop the last incomplete batch).
    """
    if world_size() == 1:
        return barlow_twins_loss(z1, z2, lambd, variant, normalization)
    return sharded_barlow_twins_loss(z1, z2, lambd, variant, normalization)


def sharded_barlow_twins_loss(z1: Tensor, z2: Tensor, lambd: float,
                              variant: Variant = "full",
                              normalization: Normalization = "batch") -> LossTerms:
    """`barlow_twins_loss` of the global batch with the D features sharded over W ranks.

    Rank r holds rows z_r (b = B/W of the global B) of all D features. One all-to-all
    gives it instead all B rows of its feature block K_r (k = ⌈D/W⌉ features; when W
    does not divide D the features are zero-padded to W·k for the transport and the
    padding is dropped on arrival, so the last blocks hold fewer, possibly no, real
    features and nothing below sees a padded column), so everything per feature is
    local: with ẑ = `standardize` over the B rows,

        c_ii  = Σ_b ẑ1_bi ẑ2_bi / B                       (i ∈ K_r)
        on_r  = Σ_{i∈K_r} (1 − c_ii)²,   dg_r = Σ_{i∈K_r} c_ii²
        G1_r  = ẑ1[:, K_r] ẑ1[:, K_r]ᵀ,  G2_r likewise     (B×B partial Grams)

    ‖c‖²_F = ‖ẑ1ᵀẑ2‖²_F / B² = Σ_ab G1_ab G2_ab / B² with G = Σ_r G_r. A reduce-scatter
    of [G1_r | G2_r] hands rank r the summed rows R_r (B/W of them) of both Grams, and

        fr_r  = Σ_{a∈R_r} Σ_b G1_ab G2_ab / B²
        (on, dg, fr) = Σ_r (on_r, dg_r, fr_r)              (one all-reduce of 3 scalars)
        off   = fr − dg,   loss = `combine`(on, off)

    so every rank returns the same global terms as `barlow_twins_loss` on the
    concatenated batch (to rounding: the sums are ordered differently).

    Gradients: every collective is autograd-visible (all-to-all ↔ the reverse
    all-to-all, reduce-scatter ↔ all-gather, all-reduce ↔ all-reduce), so backward
    differentiates what all ranks back-propagate together, Σ_r L = W·L: rank r's
    slice receives W·∂L/∂z_r and its parameters W·∂L/∂θ|_r, as with a loss of the
    all-gathered views (`gather_with_grad`), and DDP's average over W ranks yields
    ∂L/∂θ. (Summing
    the partials outside autograd would leave each rank ∂L/∂θ|_r alone, W times too
    small after DDP's average, as in the reference code.)

    Bytes sent per rank in ring collectives (elements × dtype size, f = (W−1)/W),
    forward and the same again backward: all-to-all f·2·B·k (the embeddings' dtype),
    reduce-scatter f·2·B² (float32), 3·2f scalars. The gather sends f·2·B·D each way,
    so this sends less iff B² < B·D·(1 − 1/W), i.e. global B < D·(W−1)/W; at paper
    scale (W=32, B=2048, D=8192) 0.14× the reference's all-reduce of c, the gather 0.50×.
    Padding adds W·k − D < W columns to the all-to-all: at W=24, D=8192 (k=342) 0.2 %
    more of its bytes. Per-rank Gram compute is 2·B²·k multiply-adds, about 1/W of the
    gathered loss's.

    Other normalizations (barlow.loss.normalize): "feature" standardises each row
    across its D features, which this rank holds whole before the all-to-all, so it
    is applied to z1, z2 there (in float32, and sent in float32: twice the all-to-all's
    bytes under bf16, for this ablation only); "none" uses the shard's columns as they
    are. Either way the same ẑ as the single process's enters the formulas above.

    Requires the same b on every rank. "invariance" needs no Gram gradient, so the
    Grams are then computed without autograd: they only feed the logged ``off_diag``,
    and the backward skips their all-gather.
    """
    if z1.shape != z2.shape or z1.ndim != 2:
        raise ValueError(f"expected two (batch, dim) tensors of one shape, got "
                         f"{tuple(z1.shape)} and {tuple(z2.shape)}")
    if normalization not in NORMALIZATIONS:  # before any collective: no rank waits
        raise ValueError(f"loss normalization {normalization!r} is not one of "
                         f"{list(NORMALIZATIONS)}")
    world = world_size()
    b_local, d = z1.shape
    n = b_local * world
    if n < 2:
        raise ValueError(f"batch statistics need at least 2 samples, got {n}")
    k = -(-d // world)                              # ⌈D/W⌉ features per block
    real = min(max(d - dist.get_rank() * k, 0), k)  # of them real on this rank
    group = dist.group.WORLD
    dtype = torch.promote_types(z1.dtype, torch.float32)
    with torch.autocast(z1.device.type, enabled=False):
        # Chunk s of the all-to-all input goes to rank s: this rank's rows of feature
        # block s, both views side by side, so one collective moves both. Sent in the
        # embeddings' own dtype (bf16 under autocast halves the bytes), cast after;
        # "feature" normalises whole rows first, here, where this rank has all D.
        if normalization == "feature":
            z1, z2 = normalize(z1.to(dtype), "feature"), normalize(z2.to(dtype), "feature")
        both = nn.functional.pad(torch.stack([z1, z2]), (0, world * k - d))
        blocks = both.reshape(2, b_local, world, k).permute(2, 1, 0, 3)
        shard = funcol.all_to_all_single(blocks.reshape(n, 2 * k).contiguous(),
                                         None, None, group).to(dtype)
        a, b = shard[:, :real], shard[:, k:k + real]
        if normalization == "batch":
            a, b = standardize(a), standardize(b)
        diag = (a * b).sum(dim=0) / n
        with torch.set_grad_enabled(torch.is_grad_enabled() and variant != "invariance"):
            grams = funcol.reduce_scatter_single(torch.cat([a @ a.T, b @ b.T], dim=1),
                                                 "sum", 0, group)
            frobenius_sq = (grams[:, :n] * grams[:, n:]).sum() / n**2
        totals = funcol.all_reduce(
            torch.stack([(1 - diag).square().sum(), diag.square().sum(), frobenius_sq]),
            "sum", group)
        # Unbinding the still-async result would hand out AsyncCollectiveTensor views
        # (which torch.load(weights_only=True) refuses); wait for plain tensors first.
        on_diag, diag_sq, frobenius_sq = funcol.wait_tensor(totals).unbind()
        off_diag = frobenius_sq - diag_sq
        return LossTerms(combine(on_diag, off_diag, lambd, variant), on_diag, off_diag)


@torch.no_grad()
def reduce_mean(x: Tensor) -> Tensor:
    """Mean of ``x`` over ranks, detached: for logging, never for gradients."""
    x = x.detach().clone()
    if world_size() > 1:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= world_size()
    return x


@torch.no_grad()
def reduce_sum(x: Tensor) -> Tensor:
    """Σ over ranks of ``x``, detached, on ``x``'s device: for metric sums and counts.
    Sums in ``x``'s dtype (float64 keeps counts exact and one rank's value unchanged)."""
    if world_size() == 1:
        return x
    total = x.detach().to(_collective_device(), copy=True)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(x.device)


def shard(indices: np.ndarray | int, env: DistEnv) -> np.ndarray:
    """This rank's contiguous share of ``indices`` (or of ``arange(indices)``).

    np.array_split into world_size parts whose sizes differ by at most one, so the
    shares concatenated in rank order are ``indices`` again, each row exactly once:
    `gather_rows` of per-share results restores the single-process order. (ffcv's
    distributed order instead pads every share to the same length by repeating up to
    W−1 rows, which would count them twice in an evaluation.)"""
    indices = np.arange(indices) if np.isscalar(indices) else np.asarray(indices)
    if len(indices) < env.world_size:
        raise ValueError(f"{len(indices)} rows cannot be split over {env.world_size} "
                         "processes: each needs at least one")
    return np.array_split(indices, env.world_size)[env.rank]


@torch.no_grad()
def gather_rows(x: Tensor) -> Tensor:
    """All ranks' ``x`` concatenated along dim 0 in rank order, on every rank.

    The ranks may hold different numbers of rows (the shares of `shard`); trailing
    dimensions and dtype must agree. Each share is padded to the largest for one
    all-gather and the padding cut off again, so every row appears once. Detached (for
    features and predictions, never for gradients) and returned on ``x``'s device;
    under nccl the collective runs on this rank's GPU."""
    if world_size() == 1:
        return x
    device = _collective_device()
    counts = torch.zeros(world_size(), dtype=torch.int64, device=device)
    counts[dist.get_rank()] = x.shape[0]
    dist.all_reduce(counts, op=dist.ReduceOp.SUM)
    counts = counts.tolist()
    padded = x.new_zeros((max(counts), *x.shape[1:]), device=device)
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    return torch.cat([part[:n] for part, n in zip(parts, counts)]).to(x.device)


def _collective_device() -> torch.device:
    """Where the group's collectives take their tensors: this rank's GPU under nccl,
    the CPU under gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait until every rank reaches this point."""
    if _initialized():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (e.g. a run name chosen by rank 0)."""
    if not _initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order, on every rank; ``[obj]`` alone."""
    if not _initialized():
        return [obj]
    box: list[Any] = [None] * world_size()
    dist.all_gather_object(box, obj)
    return box


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` holds on any rank, the same answer on every rank: one
    all-reduce (max) of one integer. A loop that asks it at the same point of every
    iteration stops at the same iteration on all ranks, whichever rank saw the reason."""
    if world_size() == 1:
        return flag
    seen = torch.tensor([int(flag)], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(seen, op=dist.ReduceOp.MAX)
    return bool(seen.item())


class GlobalBatchNorm(_BatchNorm):
    """Batch norm whose training statistics span the batch of all ranks, on any device.

    nn.SyncBatchNorm does the same but refuses CPU tensors; this serves gloo runs. For an
    input (N, C, *) it normalises each channel c over N and the trailing dims of every
    rank together (n = total count over ranks):

        μ_c  = Σ_ranks Σ x / n
        σ²_c = Σ_ranks Σ (x − μ_c)² / n                      (biased, to normalise with)
        y    = (x − μ_c) / sqrt(σ²_c + eps) · γ_c + β_c
        running_mean ← (1 − m)·running_mean + m·μ_c
        running_var  ← (1 − m)·running_var  + m·σ²_c·n/(n − 1)   (unbiased, as BatchNorm)

    Both sums go through the autograd-visible all-reduce, so gradients flow into every
    rank's inputs through the shared statistics. The variance is a second pass about
    the global mean rather than Σx² − nμ², which cancels catastrophically when
    |μ| ≫ σ. In eval mode, or without a process group, it is plain BatchNorm.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, ...) input, got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = (1, -1) + (1,) * (input.dim() - 2)
        x = input.to(torch.promote_types(input.dtype, torch.float32))
        count = x.new_tensor([input.numel() / input.shape[1]])
        totals = all_reduce_sum_with_grad(torch.cat([x.sum(dims), count]))
        n = totals[-1].detach()
        if n < 2:
            raise ValueError("batch norm needs more than 1 value per channel when training")
        mean = totals[:-1] / n
        centred = x - mean.reshape(shape)
        var = all_reduce_sum_with_grad(centred.square().sum(dims)) / n
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), n)
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.affine:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.to(input.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, n: Tensor) -> None:
        self.num_batches_tracked += 1
        # momentum=None means a cumulative average, as in BatchNorm.
        factor = (1.0 / float(self.num_batches_tracked) if self.momentum is None
                  else self.momentum)
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_((var * n / (n - 1)).to(self.running_var.dtype), factor)


def convert_sync_batchnorm(module: nn.Module, env: DistEnv) -> nn.Module:
    """Make every batch norm in ``module`` use global-batch statistics.

    world_size 1: ``module`` unchanged. CUDA: nn.SyncBatchNorm. CPU: `GlobalBatchNorm`.
    Parameters and buffers are shared with the replaced layers, not copied.
    """
    if env.world_size == 1:
        return module
    if env.device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _to_global_batchnorm(module)


def _to_global_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, _BatchNorm) and not isinstance(module, GlobalBatchNorm):
        converted = GlobalBatchNorm(module.num_features, module.eps, module.momentum,
                                    module.affine, module.track_running_stats)
        if module.affine:
            converted.weight = module.weight
            converted.bias = module.bias
        converted.running_mean = module.running_mean
        converted.running_var = module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.train(module.training)
        return converted
    for name, child in module.named_children():
        module.add_module(name, _to_global_batchnorm(child))
    return module


def wrap_ddp(model: nn.Module, env: DistEnv, grad_allreduce: str = "fp32") -> nn.Module:
    """``model`` in DistributedDataParallel when world_size > 1, else ``model`` itself.

    The model must already be on ``env.device``; DDP broadcasts rank 0's parameters
    and buffers at construction, so all ranks start from the same weights.
    ``grad_allreduce`` (pretrain.grad_allreduce) is the dtype the gradients travel and
    are summed in: "fp32", DDP's own all-reduce in the gradients' dtype (fp32 in
    training, as the reference), or "bf16", torch's bf16_compress_hook on any backend
    (gloo sums bf16 on the CPU, nccl on the GPU):

        g = Σ_r bf16(g_r) / W, each addition rounded to bf16, cast back to g_r's dtype

    half the bytes, for a relative error of up to 2⁻⁸ (bf16's unit roundoff) per
    rounding, W roundings or more per element. The optimiser steps in fp32 either way.
    ResNet-50 + the 8192³ projector send ≈ 600 MB of fp32 gradients per step, ≈ 18×
    the sharded loss's traffic.
    """
    if grad_allreduce not in ("fp32", "bf16"):
        raise ValueError(f"gradient all-reduce dtype {grad_allreduce!r} is not fp32 or bf16")
    if env.world_size == 1:
        return model
    device_ids = [env.device.index] if env.device.type == "cuda" else None
    ddp = DistributedDataParallel(model, device_ids=device_ids)
    if grad_allreduce == "bf16":
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    return ddp
