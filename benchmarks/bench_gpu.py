"""Our pretraining step at paper scale on one GPU: pairs/s and the fraction of peak.

ResNet-50 at 224 px + projector 8192-8192-8192, bf16 autocast, channels_last, the loss
in fp32 (barlow.loss), LARS (barlow.optim) — the step of barlow.train, on random
tensors already on the GPU (compute only; gpu_check.py's loader section times the data).

FLOPs per image pair (2 FLOPs per multiply-add, backward ≈ 2 × forward):
    backbone   3 × 2 × 4.1 GMAC × 2 views          ≈ 49.2 GFLOP
    projector  3 × 2 × (2048·8192 + 2·8192²) × 2    ≈  1.8 GFLOP
and, measured, torch.utils.flop_counter.FlopCounterMode over one step. The fraction of
peak is achieved FLOP/s over the GPU's dense bf16 peak (H100 SXM ≈ 989 TFLOP/s;
override with --peak-tflops for another card). Goal: ≥ 2,000 pairs/s on one
H100/H200 (≈ 10 % of the dense bf16 peak).

Run from the repository root:  PYTHONPATH=src python benchmarks/bench_gpu.py
"""

from __future__ import annotations

import sys

import torch

from barlow.config import ModelConfig
from barlow.distributed import distributed_barlow_twins_loss
from barlow.optim import build_optimizer, param_groups
from barlow.train import build_model
from harness import compare, parser, report

GOAL_PAIRS_PER_S = 2000
PEAKS_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def analytic_flops_per_pair(proj: int = 8192, feat: int = 2048) -> float:
    backbone = 3 * 2 * 4.1e9 * 2
    projector = 3 * 2 * (feat * proj + 2 * proj * proj) * 2
    return backbone + projector


def main() -> None:
    p = parser(__doc__, rounds=20, warmup=5)
    p.add_argument("--batch", type=int, default=256, help="pairs per step")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--smoke", action="store_true",
                   help="32 px, a 64-wide projector, CPU allowed: checks the code path only")
    args = p.parse_args()
    if not torch.cuda.is_available() and not args.smoke:
        print("bench_gpu: no CUDA device here; this benchmark needs a GPU (written for one "
              "H100) and was not run.", file=sys.stderr)
        sys.exit(2)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAKS_TFLOPS.items() if k in name), None)
    # As barlow.train on a GPU: cuDNN autotuning on, TF32 matmuls off (the loss is fp32
    # on purpose; the network's matmuls run in bf16 under autocast anyway).
    torch.backends.cudnn.benchmark = True
    torch.manual_seed(0)
    res, projector = (32, "64-64-64") if args.smoke else (224, "8192-8192-8192")
    model = build_model(ModelConfig(arch="resnet50", width=64, layers=(2, 2, 2, 2),
                                    projector=projector, projector_bn=True))
    model = model.to(device, memory_format=torch.channels_last).train()
    opt = build_optimizer("lars", param_groups(model, 1.5e-6), momentum=0.9, eta=0.001)
    for group in opt.param_groups:
        group["lr"] = 0.2 if group["name"] == "weights" else 0.0048
    net = torch.compile(model) if args.compile else model
    y1, y2 = (torch.randn(args.batch, 3, res, res, device=device)
              .contiguous(memory_format=torch.channels_last) for _ in range(2))

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            z1, z2 = net(y1, y2)
        loss = distributed_barlow_twins_loss(z1, z2, 0.0051).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_step() -> int:
        step()
        sync()
        return args.batch

    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    measured_per_pair = counter.get_total_flops() / args.batch
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = compare({"step": timed_step}, args.rounds, args.warmup)
    sec, pairs = results["step"].median_s, results["step"].rate
    memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    print(f"{name}, torch {torch.__version__}, batch {args.batch}, bf16 autocast, "
          f"channels_last, compile={args.compile}; median of {args.rounds} steps")
    print(f"step {sec * 1e3:.1f} ms → {pairs:.0f} pairs/s per GPU "
          f"(goal ≥ {GOAL_PAIRS_PER_S}: {'meets' if pairs >= GOAL_PAIRS_PER_S else 'misses'}, "
          f"ratio {pairs / GOAL_PAIRS_PER_S:.2f}); peak memory "
          f"{memory if memory is None else round(memory, 1)} GiB")
    figures = {"device": name, "torch": torch.__version__, "batch": args.batch,
               "step_ms": round(sec * 1e3, 2), "pairs_per_s": round(pairs, 1),
               "goal_pairs_per_s": GOAL_PAIRS_PER_S,
               "peak_memory_gib": memory if memory is None else round(memory, 2)}
    for label, flops in (("analytic", analytic_flops_per_pair()),
                         ("measured", measured_per_pair)):
        achieved = flops * pairs / 1e12
        frac = f", {achieved / peak:.1%} of {peak:.0f} TFLOP/s peak" if peak else ""
        print(f"FLOPs/pair {label}: {flops / 1e9:.1f} G → {achieved:.0f} TFLOP/s{frac}")
        figures[f"gflop_per_pair_{label}"] = round(flops / 1e9, 2)
        figures[f"tflops_{label}"] = round(achieved, 1)
        if peak:
            figures[f"fraction_of_peak_{label}"] = round(achieved / peak, 4)
    print("(reference: 32 V100 in the paper ≈ 90 pairs/s per GPU)")
    report(results, "pairs/s", json_path=args.json, args=vars(args), extra=figures)


if __name__ == "__main__":
    main()
