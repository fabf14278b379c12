"""DVC stages `convert` and `convert_transfer`: real images → FFCV .beton + manifest."""

from __future__ import annotations

from pathlib import Path

import click

from barlow.config import DataConfig, load_section
from barlow.data import sources
from barlow.data.convert import FfcvSettings, write_beton
from barlow.stage import run_stage

# Small grey data is stored raw at native size: lossless and decoded fastest.
RAW = FfcvSettings(write_mode="raw")


def writers(source: sources.Source, cfg: DataConfig) -> int:
    """Processes for ffcv's writer. With several, pages land in completion order and the
    file's bytes differ from run to run (its content does not). In-memory sources write
    in seconds with one, and a byte-identical .beton lets DVC skip every later stage
    when convert reruns; decoding an ImageFolder needs the parallelism."""
    return cfg.workers if source.files is not None else 1


@click.group()
def cli() -> None:
    """Convert image sources into FFCV datasets (paths from argv, settings from params.yaml)."""


@cli.command()
@click.option("--params", default="params.yaml", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def main(params: str, out_dir: Path) -> None:
    """The pretraining/evaluation data set: OUT/train.beton and OUT/test.beton."""
    with run_stage("convert"):
        cfg = load_section(DataConfig, "data", params)
        if cfg.source == "fashion_mnist":
            train = sources.fashion_mnist(cfg.fashion_mnist_dir, "train")
            test = sources.fashion_mnist(cfg.fashion_mnist_dir, "test")
            settings = RAW
        else:
            root = Path(cfg.imagefolder_root)
            # ImageNet's labelled "val" split is the de facto test set.
            train = sources.image_folder(root / "train", "train", None, cfg.skip_bad, cfg.workers)
            test = sources.image_folder(root / "val", "test", train.class_names, cfg.skip_bad,
                                        cfg.workers)
            settings = FfcvSettings(**vars(cfg.ffcv))
        for source in (train, test):
            manifest = write_beton(source, out_dir / f"{source.split}.beton", settings,
                                   writers(source, cfg), cfg.seed)
            click.echo(f"convert: {source.split}: {manifest['num_images']} images,"
                       f" {manifest['num_classes']} classes, {len(manifest['skipped'])} skipped")


@cli.command()
@click.option("--params", default="params.yaml", show_default=True)
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path))
def transfer(params: str, out_dir: Path) -> None:
    """The transfer sets: scikit-learn digits and ELPV solar cells (offline), and PASCAL
    VOC2007 from the devkit at data.voc07_root when it is set."""
    with run_stage("convert_transfer"):
        cfg = load_section(DataConfig, "data", params)
        elpv = FfcvSettings(write_mode="raw", max_resolution=cfg.elpv_resolution)
        voc07 = FfcvSettings(write_mode="raw", max_resolution=cfg.voc07_resolution)
        # Both devkit splits are read (and every image decoded) before anything is
        # written, so a broken devkit leaves no half-converted output.
        voc = ({split: sources.voc07(cfg.voc07_root, split, cfg.skip_bad, cfg.workers)
                for split in ("train", "test")} if cfg.voc07_root else {})
        for split in ("train", "test"):
            sets = [(sources.digits(split, cfg.transfer_test_fraction, cfg.seed), RAW),
                    (sources.elpv(split, cfg.transfer_test_fraction, cfg.seed), elpv)]
            if voc:
                sets.append((voc[split], voc07))
            for source, settings in sets:
                # One writer for VOC's JPEG files too: its ~10k images write in minutes,
                # and a byte-identical .beton lets DVC skip `transfer` when this reruns.
                manifest = write_beton(source, out_dir / f"{source.name}_{split}.beton",
                                       settings, 1, cfg.seed)
                click.echo(f"convert_transfer: {source.name} {split}: {manifest['num_images']}"
                           f" images, {manifest['num_classes']} classes,"
                           f" {len(manifest['skipped'])} skipped")


if __name__ == "__main__":
    cli()
