"""DVC stage `pretrain`: Barlow Twins pretraining in machine.devices processes.

    python -m stages.pretrain --data data/ffcv --out models/pretrain --live dvclive/pretrain

Started by hand or by DVC, the command checks the params, then trains in this process
(one device) or starts the processes itself through torchrun's launcher; a
worker's reported error or stop (exit 2, 3, 4 or 5) is passed on as the same status
and one line, without torchrun's failure report. On several nodes (docs/multi-gpu.md)
each node's launcher joins the others. Only rank 0 writes (checkpoints, the exported
backbone, dvclive metrics and plots) and prints progress.

SIGTERM or SIGUSR1 (a scheduler's pre-emption or time-limit warning) to the command, to
its workers, or to both: the run finishes its step, writes its checkpoint and exits 4;
the next run resumes there and ends as an uninterrupted run would.
"""

from __future__ import annotations

from pathlib import Path

import click

from barlow import distributed as dist
from barlow.config import (AugmentConfig, LossConfig, ModelConfig, PretrainConfig,
                           load_section)
from barlow.interrupt import stop_requests
from barlow.stage import (FAULT, data_option, fail, live_option, machine_shape, open_live,
                          params_option, run_in_workers, run_stage)
from barlow.train import PretrainSetup, TrainingFault, export, pretrain


@click.command()
@params_option
@data_option
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for checkpoint.pt (resumable) and backbone.pt (torchvision layout)")
@live_option
def main(params: str, data_dir: Path, out_dir: Path, live_dir: Path) -> None:
    """Barlow Twins pretraining on DATA/train.beton (kNN monitor on DATA/test.beton).

    Reads the params sections model, loss, augment, pretrain and machine. Writes
    OUT/checkpoint.pt (every epoch and pretrain.checkpoint_every_steps; a rerun resumes
    it), then OUT/backbone.pt, and LIVE/metrics.json with LIVE/plots/ (loss terms, lrs,
    pairs/s, kNN top-1). Prints a progress line per epoch (and at most every 10 s).
    Exit 2: bad params or data; 3: non-finite loss or no step taken; 4: pre-empted
    (SIGTERM/SIGUSR1), checkpoint written; 5: an output the file system refused."""
    with run_stage("pretrain"):
        setup = PretrainSetup(model=load_section(ModelConfig, "model", params),
                              loss=load_section(LossConfig, "loss", params),
                              augment=load_section(AugmentConfig, "augment", params),
                              pretrain=load_section(PretrainConfig, "pretrain", params))
        # Checked before any process is started: a bad value is one line.
        shape = machine_shape(params, device="pretrain")
        setup.pretrain.check_world(shape.devices)
        run_in_workers("stages.pretrain", shape.devices)
        # Until the process group is gone: a worker that stopped is not killed by
        # the launcher's SIGTERM to the others while it leaves the group.
        with stop_requests() as stop_requested:
            env = dist.init(timeout_s=shape.collective_timeout_s)
            try:
                live = None

                def log(step: int, metrics: dict[str, float]) -> None:
                    # Created at the first log line, after params and data were checked,
                    # so a run that fails early leaves no metrics that look valid.
                    nonlocal live
                    if not env.is_main:
                        return
                    if live is None:
                        live = open_live(live_dir, env)
                    live.step = step
                    for key, value in metrics.items():
                        live.log_metric(f"pretrain/{key}", value)
                    live.next_step()

                try:
                    result = pretrain(setup, data_dir / "train.beton", data_dir / "test.beton",
                                      out_dir, env, log, num_workers=shape.threads,
                                      stop_requested=stop_requested)
                except TrainingFault as err:
                    # A fault mid-run; bad input exits 2 (run_stage).
                    fail("pretrain", err, FAULT)
                export(result["model"], out_dir, env)
                if live is not None:
                    live.end()
            finally:
                dist.shutdown()


if __name__ == "__main__":
    main()
