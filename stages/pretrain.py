"""DVC stage `pretrain`: Barlow Twins pretraining, launched through torchrun.

    torchrun --nproc_per_node=N -m stages.pretrain --data data/ffcv --out models/pretrain

Only rank 0 writes (checkpoints, the exported backbone, dvclive metrics and plots).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from barlow import distributed as dist
from barlow.config import (AugmentConfig, LossConfig, ModelConfig, PretrainConfig,
                           load_section)
from barlow.stage import data_option, live_option, params_option, run_stage
from barlow.train import NonFiniteLossError, PretrainSetup, export, pretrain


@click.command()
@params_option
@data_option
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
@live_option
def main(params: str, data_dir: Path, out_dir: Path, live_dir: Path) -> None:
    with run_stage("pretrain"):
        setup = PretrainSetup(model=load_section(ModelConfig, "model", params),
                              loss=load_section(LossConfig, "loss", params),
                              augment=load_section(AugmentConfig, "augment", params),
                              pretrain=load_section(PretrainConfig, "pretrain", params))
        env = dist.init(timeout_s=setup.pretrain.collective_timeout_s)
        try:
            live = None

            def log(step: int, metrics: dict[str, float]) -> None:
                # Created at the first log line, after params and data were checked,
                # so a run that fails early leaves no metrics that look valid.
                nonlocal live
                if not env.is_main:
                    return
                if live is None:
                    from dvclive import Live

                    live = Live(dir=str(live_dir), dvcyaml=None, save_dvc_exp=False,
                                report=None)
                live.step = step
                for key, value in metrics.items():
                    live.log_metric(f"pretrain/{key}", value)
                live.next_step()

            try:
                result = pretrain(setup, data_dir / "train.beton", data_dir / "test.beton",
                                  out_dir, env, log)
            except NonFiniteLossError as err:  # a fault mid-run; bad input exits 2 (run_stage)
                print(f"pretrain: error: {err}", file=sys.stderr)
                sys.exit(3)
            export(result["model"], out_dir, env)
            if live is not None:
                live.end()
        finally:
            dist.shutdown()


if __name__ == "__main__":
    main()
