"""Two (and three) gloo processes on the CPU must reproduce one process on the
concatenated batch.

One spawn runs every two-process check, another the three-process sharded-loss check
(dimensions the ranks do not divide); the workers save what they saw and the
assertions run here, against single-process references computed in this process.
"""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from barlow import distributed as bdist
from barlow.loss import NORMALIZATIONS, VARIANTS, barlow_twins_loss
from barlow.models import BarlowTwins, Projector, small_resnet

WORLD = 2
BATCH = 8          # global; each rank takes a contiguous half
LAMBD = 0.0051
BN_SPLIT = 3       # the GlobalBatchNorm check gives rank 0 three samples, rank 1 five
ODD_DIM = 5        # not divisible by WORLD
WORLD3 = 3
BATCH3 = 6         # global; two rows per rank
DIMS3 = (7, 2)     # 7 = 3 + 3 + 1 features per rank; 2 leaves rank 2 no real feature
# The loss ablations run through DDP: name -> (loss variant, loss normalization,
# projector batch norm). Every variant with the paper's normalisation, then the
# paper's other rows: feature-dim normalisation, no BN in the projector, and neither
# BN nor normalisation.
# Three ranks: every variant with the paper's normalisation, every normalization with
# the full loss, for each D.
CASES3 = [(d, v, "batch") for d in DIMS3 for v in VARIANTS] + \
         [(d, "full", nm) for d in DIMS3 for nm in NORMALIZATIONS if nm != "batch"]
RUNS = ({f"exact-{v}": (v, "batch", True) for v in VARIANTS}
        | {"exact-feature": ("full", "feature", True),
           "exact-nobn": ("full", "batch", False),
           "exact-nobn-none": ("full", "none", False)})


def make_model(projector_bn: bool = True) -> nn.Module:
    backbone, dim = small_resnet(width=4, layers=(1, 1, 1, 1))
    return BarlowTwins(backbone, Projector(dim, "16-16", projector_bn)).double()


def make_bn(case) -> nn.Module:
    """The batch norm of one GlobalBatchNorm case, with non-trivial affine parameters."""
    cls = nn.BatchNorm2d if case["xs"][0].dim() == 4 else nn.BatchNorm1d
    bn = cls(case["xs"][0].shape[1], momentum=case["momentum"]).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(3))
        bn.bias.uniform_(-1, 1, generator=torch.Generator().manual_seed(4))
    return bn


def run_bn_case(bn, case, rows):
    """Training steps on the ``rows`` of each input, one backward of Σ_steps Σ y·w,
    then an eval-mode forward of the first input."""
    xs = [x[rows].clone().requires_grad_() for x in case["xs"]]
    ys = [bn(x) for x in xs]
    sum((y * w[rows]).sum() for y, w in zip(ys, case["ws"])).backward()
    bn.eval()
    return {
        "y": [y.detach() for y in ys], "x_grad": [x.grad for x in xs],
        "weight_grad": bn.weight.grad, "bias_grad": bn.bias.grad,
        "buffers": {k: b.clone() for k, b in bn.named_buffers()},
        "eval": bn(case["xs"][0][rows]).detach(),
    }


def gathered_barlow_twins_loss(z1, z2, lambd):
    """`barlow_twins_loss` of the global batch with both views all-gathered: the simple
    form the sharded loss is compared with. The gather's backward sums the W identical
    contributions, so rank r gets W·∂L/∂z_r and DDP's average over W ranks gives the
    exact ∂L/∂θ, as the sharded loss does."""
    return barlow_twins_loss(bdist.gather_with_grad(z1), bdist.gather_with_grad(z2), lambd)


def naive_reference_code_loss(z1, z2, lambd):
    """The reference implementation's scheme: global BN, then c all-reduced outside
    autograd. Kept here to show the tests can tell it from the exact gradient."""
    bn = bdist.GlobalBatchNorm(z1.shape[1], affine=False).double()
    c = bn(z1).T @ bn(z2) / (z1.shape[0] * dist.get_world_size())
    with torch.no_grad():  # as the reference's all_reduce(c): autograd never sees it
        dist.all_reduce(c)
    on = (torch.diagonal(c) - 1).square().sum()
    off = c.square().sum() - torch.diagonal(c).square().sum()
    return on + lambd * off


def worker(rank: int, port: int, payload_path: str, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = bdist.init(backend="gloo", timeout_s=60)
    payload = torch.load(payload_path)
    half = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    y1, y2 = payload["y1"][half], payload["y2"][half]
    out = {"env": (env.rank, env.local_rank, env.world_size, str(env.device), env.is_main)}

    # Which implementation distributed_barlow_twins_loss dispatched to, per call.
    paths = []

    def traced(*args, _real=bdist.sharded_barlow_twins_loss):
        paths.append("sharded_barlow_twins_loss")
        return _real(*args)
    bdist.sharded_barlow_twins_loss = traced

    for name, run in (RUNS | {"naive": None}).items():
        variant, normalization, projector_bn = run or ("full", "batch", True)
        model = make_model(projector_bn)
        model.load_state_dict(payload["state" if projector_bn else "state_nobn"])
        model = bdist.wrap_ddp(bdist.convert_sync_batchnorm(model, env), env)
        z1, z2 = model(y1, y2)
        if run is None:
            loss = naive_reference_code_loss(z1, z2, LAMBD)
        else:
            terms = bdist.distributed_barlow_twins_loss(z1, z2, LAMBD, variant, normalization)
            out[name + "_terms"] = [t.detach() for t in terms]
            loss = terms.loss
        loss.backward()
        out[name] = {k: p.grad.clone() for k, p in model.module.named_parameters()}
        out[name + "_buffers"] = {k: b.clone() for k, b in model.module.named_buffers()}
        if projector_bn:
            out["bn_types"] = sorted({type(m).__name__ for m in model.modules()
                                      if isinstance(m, nn.modules.batchnorm._BatchNorm)})

    # D = ODD_DIM does not divide over the ranks: padded feature blocks.
    out["odd"] = {}
    for name, loss_fn in (("sharded", bdist.distributed_barlow_twins_loss),
                          ("gathered", gathered_barlow_twins_loss)):
        z1, z2 = (payload[k][half].clone().requires_grad_() for k in ("odd1", "odd2"))
        terms = loss_fn(z1, z2, LAMBD)
        terms.loss.backward()
        out["odd"][name] = {"terms": [t.detach() for t in terms], "grads": [z1.grad, z2.grad]}
    out["paths"] = list(paths)

    # pretrain.grad_allreduce: bf16, the paper's loss and model otherwise.
    model = make_model()
    model.load_state_dict(payload["state"])
    model = bdist.wrap_ddp(bdist.convert_sync_batchnorm(model, env), env, "bf16")
    bdist.distributed_barlow_twins_loss(*model(y1, y2), LAMBD).loss.backward()
    out["bf16-allreduce"] = {k: p.grad.clone() for k, p in model.module.named_parameters()}

    rows = slice(0, BN_SPLIT) if rank == 0 else slice(BN_SPLIT, None)
    out["bn"] = []
    for case in payload["bn_cases"]:
        bn = bdist.convert_sync_batchnorm(make_bn(case), env)
        out["bn"].append({"type": type(bn).__name__, **run_bn_case(bn, case, rows)})

    out["reduce_mean"] = bdist.reduce_mean(torch.tensor(float(rank)))
    out["broadcast"] = bdist.broadcast_object({"from": rank})
    bdist.barrier()
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    bdist.shutdown()


def worker3(rank: int, port: int, payload_path: str, out_dir: str) -> None:
    """Three ranks, embeddings whose dimension 3 does not divide: the sharded loss
    with padded feature blocks, every variant and every normalization."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD3), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    bdist.init(backend="gloo", timeout_s=60)
    payload = torch.load(payload_path)
    rows = slice(rank * BATCH3 // WORLD3, (rank + 1) * BATCH3 // WORLD3)
    out = {}
    for d, variant, normalization in CASES3:
        z1, z2 = (payload[f"{k}{d}"][rows].clone().requires_grad_() for k in ("z1_", "z2_"))
        terms = bdist.sharded_barlow_twins_loss(z1, z2, LAMBD, variant, normalization)
        terms.loss.backward()
        out[d, variant, normalization] = {"terms": [t.detach() for t in terms],
                                          "grads": [z1.grad, z2.grad]}
    torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    bdist.shutdown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def payload():
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = make_model()
    # Undo zero_init_residual so that every parameter receives a gradient to compare.
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            nn.init.uniform_(m.weight, 0.5, 1.5, generator=g)
            nn.init.uniform_(m.bias, -0.5, 0.5, generator=g)
    state = model.state_dict()
    # The no-BN projector: the same backbone; the projector's own seeded weights and
    # non-zero biases, so that every bias receives a gradient to compare.
    nobn = make_model(projector_bn=False)
    nobn.backbone.load_state_dict(model.backbone.state_dict())
    for m in nobn.projector:
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.uniform_(m.bias, -0.5, 0.5, generator=g)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    return {
        "state": state, "state_nobn": nobn.state_dict(),
        "y1": rand(BATCH, 3, 8, 8), "y2": rand(BATCH, 3, 8, 8),
        "odd1": rand(BATCH, ODD_DIM), "odd2": rand(BATCH, ODD_DIM),
        # 4D with an exponential running average and 2D with a cumulative one; the
        # offset mean checks that the variance does not cancel catastrophically.
        "bn_cases": [
            {"momentum": 0.3, "xs": [rand(BATCH, 3, 4, 4) * 2 + 50, rand(BATCH, 3, 4, 4) - 1],
             "ws": [rand(BATCH, 3, 4, 4), rand(BATCH, 3, 4, 4)]},
            {"momentum": None, "xs": [rand(BATCH, 5) * 3 + 1, rand(BATCH, 5)],
             "ws": [rand(BATCH, 5), rand(BATCH, 5)]},
        ],
    }


@pytest.fixture(scope="module")
def results(payload, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dist")
    torch.save(payload, tmp / "payload.pt")
    mp.spawn(worker, args=(free_port(), str(tmp / "payload.pt"), str(tmp)), nprocs=WORLD)
    return [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(payload):
    """One process, no conversion, the whole batch."""
    out = {"bn": [run_bn_case(make_bn(case), case, slice(None))
                  for case in payload["bn_cases"]]}
    for name, (variant, normalization, projector_bn) in RUNS.items():
        model = make_model(projector_bn)
        model.load_state_dict(payload["state" if projector_bn else "state_nobn"])
        terms = barlow_twins_loss(*model(payload["y1"], payload["y2"]), LAMBD, variant,
                                  normalization)
        terms.loss.backward()
        out[name] = {"terms": [t.detach() for t in terms],
                        "grads": {k: p.grad for k, p in model.named_parameters()},
                        "buffers": dict(model.named_buffers())}
    z1, z2 = (payload[k].clone().requires_grad_() for k in ("odd1", "odd2"))
    terms = barlow_twins_loss(z1, z2, LAMBD)
    terms.loss.backward()
    out["odd"] = {"terms": [t.detach() for t in terms], "grads": [z1.grad, z2.grad]}
    return out


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """(what the 3 ranks saw, the single-process loss and gradients) per (D, variant)."""
    g = torch.Generator().manual_seed(5)
    payload = {}
    for d in DIMS3:
        payload[f"z1_{d}"] = torch.randn(BATCH3, d, generator=g, dtype=torch.float64)
        payload[f"z2_{d}"] = payload[f"z1_{d}"] + torch.randn(BATCH3, d, generator=g,
                                                            dtype=torch.float64)
    tmp = tmp_path_factory.mktemp("dist3")
    torch.save(payload, tmp / "payload.pt")
    mp.spawn(worker3, args=(free_port(), str(tmp / "payload.pt"), str(tmp)), nprocs=WORLD3)
    ranks = [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD3)]
    reference = {}
    for d, variant, normalization in CASES3:
        z1, z2 = (payload[f"{k}{d}"].clone().requires_grad_() for k in ("z1_", "z2_"))
        terms = barlow_twins_loss(z1, z2, LAMBD, variant, normalization)
        terms.loss.backward()
        reference[d, variant, normalization] = {"terms": [t.detach() for t in terms],
                                                "grads": [z1.grad, z2.grad]}
    return ranks, reference


def assert_close(got, want, msg=""):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-10, msg=lambda m: f"{msg}: {m}")


@pytest.mark.slow
def test_environment(results):
    for rank, out in enumerate(results):
        assert out["env"] == (rank, rank, WORLD, "cpu", rank == 0)
        assert out["reduce_mean"].item() == pytest.approx(0.5)
        assert out["broadcast"] == {"from": 0}
        assert out["bn_types"] == ["GlobalBatchNorm"]


@pytest.mark.slow
def test_sharded_path_serves_every_dimension(results):
    for out in results:
        # Every distributed_barlow_twins_loss call, odd D included.
        assert out["paths"] == ["sharded_barlow_twins_loss"] * (len(RUNS) + 1)


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_loss_equals_single_process_loss(results, reference, run):
    for out in results:
        for got, want in zip(out[f"{run}_terms"], reference[run]["terms"]):
            assert_close(got, want, "loss terms")


@pytest.mark.slow
@pytest.mark.parametrize("run", RUNS)
def test_gradients_equal_single_process_gradients(results, reference, run):
    grads = reference[run]["grads"]
    assert grads  # every parameter, backbone BN included
    for out in results:
        assert out[run].keys() == grads.keys()
        for name, want in grads.items():
            assert want.abs().max() > 0, name
            assert_close(out[run][name], want, name)


@pytest.mark.slow
def test_bf16_allreduce_rounds_the_gradients_to_bf16(results, reference):
    """pretrain.grad_allreduce: bf16 sends each rank's gradient in bf16 and sums it
    there: the result differs from the exact gradient (which the fp32 default gives,
    above) by bf16's rounding, at least one element far beyond float tolerance, none
    beyond a few bf16 roundings of the largest gradient of its tensor."""
    worst = 0.0
    for out in results:
        for name, want in reference["exact-full"]["grads"].items():
            error = (out["bf16-allreduce"][name] - want).abs().max() / want.abs().max()
            assert error <= 4 * 2.0**-8, name
            worst = max(worst, float(error))
    assert worst > 1e-3


@pytest.mark.slow
def test_batchnorm_buffers_equal_single_process_buffers(results, reference):
    for out in results:
        for name, want in reference["exact-full"]["buffers"].items():
            assert_close(out["exact-full_buffers"][name], want, name)


@pytest.mark.slow
def test_reference_code_scheme_divides_gradients_by_world_size(results, reference):
    # What facebookresearch/barlowtwins computes; caught here so the exact test above
    # is known to distinguish the two.
    for out in results:
        for name, want in reference["exact-full"]["grads"].items():
            assert_close(out["naive"][name] * WORLD, want, name)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["sharded", "gathered"])
def test_loss_when_dim_does_not_divide(results, reference, impl):
    want = reference["odd"]
    for out in results:
        for got, w in zip(out["odd"][impl]["terms"], want["terms"]):
            assert_close(got, w, "loss terms")
    # Each rank's slice receives W·∂L/∂z_r, which DDP's average turns into ∂L/∂θ.
    for view in range(2):
        got = torch.cat([out["odd"][impl]["grads"][view] for out in results])
        assert_close(got / WORLD, want["grads"][view], f"view {view + 1} gradient")


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES3, ids=lambda c: "-".join(map(str, c)))
def test_three_ranks_shard_dimensions_they_do_not_divide(three, case):
    ranks, reference = three
    want = reference[case]
    for out in ranks:
        for got, w in zip(out[case]["terms"], want["terms"]):
            assert_close(got, w, "loss terms")
    for view in range(2):
        assert want["grads"][view].abs().max() > 0
        got = torch.cat([out[case]["grads"][view] for out in ranks])
        assert_close(got / WORLD3, want["grads"][view], f"view {view + 1} gradient")


@pytest.mark.slow
@pytest.mark.parametrize("case", [0, 1], ids=["4d-momentum", "2d-cumulative"])
def test_global_batchnorm_matches_batchnorm_on_uneven_batches(results, reference, case):
    want = reference["bn"][case]
    parts = [out["bn"][case] for out in results]
    assert [p["type"] for p in parts] == ["GlobalBatchNorm"] * WORLD

    def cat(key):
        return [torch.cat(step) for step in zip(*(p[key] for p in parts))]

    for key in ("y", "x_grad"):
        for got, w in zip(cat(key), want[key]):
            assert_close(got, w, key)
    assert_close(torch.cat([p["eval"] for p in parts]), want["eval"], "eval")
    # Parameter gradients are each rank's share; DDP would sum them (and divide by W).
    for key in ("weight_grad", "bias_grad"):
        assert_close(sum(p[key] for p in parts), want[key], key)
    for part in parts:
        for name, w in want["buffers"].items():
            assert_close(part["buffers"][name], w, name)


def test_single_process_helpers_are_identities(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    env = bdist.init(timeout_s=60)
    assert (env.rank, env.world_size, env.is_main) == (0, 1, True)
    assert env.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    assert bdist.convert_sync_batchnorm(model, env) is model
    assert bdist.wrap_ddp(model, env) is model
    x = torch.randn(4, 3, requires_grad=True)
    assert bdist.gather_with_grad(x) is x
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    for got, want in zip(bdist.distributed_barlow_twins_loss(z1, z2, LAMBD),
                         barlow_twins_loss(z1, z2, LAMBD)):
        assert torch.equal(got, want)
    # Without a process group GlobalBatchNorm is BatchNorm, in both modes.
    bn, ref = bdist.GlobalBatchNorm(3), nn.BatchNorm1d(3)
    y = torch.randn(5, 3)
    torch.testing.assert_close(bn(y), ref(y))
    torch.testing.assert_close(bn.running_var, ref.running_var)
    bdist.barrier()
    bdist.shutdown()
