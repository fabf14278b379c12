"""DVC stages `convert` and `convert_transfer`: real images → FFCV .beton + manifest."""

from __future__ import annotations

import os
import sys
from pathlib import Path

# ffcv's writer draws a tqdm bar, which in a log file (not a terminal) is a run of
# carriage returns; there the lines below replace it. tqdm reads TQDM_* at import.
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")

import click  # noqa: E402 (after the tqdm setting)

from barlow.config import DataConfig, load_section  # noqa: E402
from barlow.data import sources  # noqa: E402
from barlow.data.convert import FfcvSettings, write_beton  # noqa: E402
from barlow.stage import machine_shape, params_option, run_stage  # noqa: E402

# Small grey data is stored raw at native size: lossless and decoded fastest.
RAW = FfcvSettings(write_mode="raw")


def writers(source: sources.Source, processes: int) -> int:
    """Processes for ffcv's writer (``processes``: machine.cores). With several, pages land in completion order and the
    file's bytes differ from run to run (its content does not). In-memory sources write
    in seconds with one, and a byte-identical .beton lets DVC skip every later stage
    when convert reruns; decoding an ImageFolder needs the parallelism."""
    return processes if source.files is not None else 1


def image_folder_splits(root: str | Path, cfg: DataConfig,
                        processes: int) -> tuple[sources.Source, sources.Source]:
    """(train, test) of an ImageNet-layout tree: ``root/train/<class>/*`` and
    ``root/val/<class>/*``, the labelled "val" split being the de facto test set; the
    test split's labels follow the train split's class order. Each file is read by
    one of ``processes``."""
    root = Path(root)
    train = sources.image_folder(root / "train", "train", None, cfg.skip_bad, processes)
    test = sources.image_folder(root / "val", "test", train.class_names, cfg.skip_bad,
                                processes)
    return train, test


def folder_splits(name: str, root: str, cfg: DataConfig,
                  processes: int) -> tuple[sources.Source, sources.Source]:
    """image_folder_splits of data.transfer_folders' entry ``name``; an error names the
    key as well as the folder."""
    try:
        return image_folder_splits(root, cfg, processes)
    except sources.DataError as err:
        raise sources.DataError(f"data.transfer_folders.{name}: {err}") from None


@click.group()
def cli() -> None:
    """Convert image sources into FFCV datasets (paths from argv, settings from params.yaml):
    `dataset` for the convert stage, `transfer` for convert_transfer."""


@cli.command()
@params_option
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for train.beton, test.beton and their .json manifests")
def dataset(params: str, out_dir: Path) -> None:
    """The pretraining/evaluation data set: OUT/train.beton and OUT/test.beton.

    Reads the params section data (source, fashion_mnist_dir or imagefolder_root, ffcv,
    skip_bad, seed), machine.cores (processes) and the images it names; an ImageFolder tree is decoded
    once in full (progress lines) before anything is written. Writes OUT/{train,test}
    .beton, OUT/{train,test}.json (counts, classes, mean/std, settings, input checksum)
    and, for ImageFolder trees, OUT/{train,test}.files.txt. Exit 2: bad params or an
    unreadable image (unless data.skip_bad)."""
    with run_stage("convert"):
        cfg = load_section(DataConfig, "data", params)
        processes = machine_shape(params).cores
        if cfg.source == "fashion_mnist":
            train = sources.fashion_mnist(cfg.fashion_mnist_dir, "train")
            test = sources.fashion_mnist(cfg.fashion_mnist_dir, "test")
            settings = RAW
        else:
            train, test = image_folder_splits(cfg.imagefolder_root, cfg, processes)
            settings = FfcvSettings(**vars(cfg.ffcv))
        for source in (train, test):
            click.echo(f"convert: writing {source.split} ({len(source)} images)")
            manifest = write_beton(source, out_dir / f"{source.split}.beton", settings,
                                   writers(source, processes), cfg.seed)
            click.echo(f"convert: {source.split}: {manifest['num_images']} images,"
                       f" {manifest['num_classes']} classes, {len(manifest['skipped'])} skipped")


@cli.command()
@params_option
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path),
              help="folder for NAME_{train,test}.beton and their .json manifests")
def transfer(params: str, out_dir: Path) -> None:
    """The transfer sets: scikit-learn digits and ELPV solar cells (offline), PASCAL
    VOC2007 from the devkit at data.voc07_root when it is set, and each ImageFolder tree
    of data.transfer_folders (Places-205, iNat18, ...) as NAME_{train,test}.beton.

    Reads the params data.seed, transfer_test_fraction, elpv_resolution, voc07_root,
    voc07_resolution, transfer_folders, ffcv and skip_bad, and machine.cores. Writes
    OUT/NAME_{train,test}.beton and .json per set. Exit 2: bad params or input."""
    with run_stage("convert_transfer"):
        cfg = load_section(DataConfig, "data", params)
        processes = machine_shape(params).cores
        elpv = FfcvSettings(write_mode="raw", max_resolution=cfg.elpv_resolution)
        voc07 = FfcvSettings(write_mode="raw", max_resolution=cfg.voc07_resolution)
        imagefolder = FfcvSettings(**vars(cfg.ffcv))
        # Both devkit splits and every folder tree are listed, checked and hashed before
        # anything is written, so a missing, empty or misnamed input stops the stage in
        # seconds. A corrupt image is found by the writer's decode: that .beton is not
        # written, and the failed stage leaves DVC nothing to commit.
        voc = ({split: sources.voc07(cfg.voc07_root, split, cfg.skip_bad, processes)
                for split in ("train", "test")} if cfg.voc07_root else {})
        folders = {name: dict(zip(("train", "test"), folder_splits(name, root, cfg, processes)))
                   for name, root in cfg.transfer_folders.items()}
        for split in ("train", "test"):
            # One writer for VOC's JPEG files too: its ~10k images write in minutes,
            # and a byte-identical .beton lets DVC skip `transfer` when this reruns.
            sets = [("digits", sources.digits(split, cfg.transfer_test_fraction, cfg.seed),
                     RAW, 1),
                    ("elpv", sources.elpv(split, cfg.transfer_test_fraction, cfg.seed), elpv, 1)]
            if voc:
                sets.append(("voc07", voc[split], voc07, 1))
            # Folder trees are ImageNet-size: stored, and written, as `dataset` writes
            # ImageNet (Places-205's 2.4M images need the writer processes; with
            # machine.cores: 1 their .beton files too are byte-identical on reruns).
            sets += [(name, pair[split], imagefolder, writers(pair[split], processes))
                     for name, pair in folders.items()]
            for name, source, settings, processes in sets:
                click.echo(f"convert_transfer: writing {name} {split} ({len(source)} images)")
                manifest = write_beton(source, out_dir / f"{name}_{split}.beton", settings,
                                       processes, cfg.seed)
                click.echo(f"convert_transfer: {name} {split}: {manifest['num_images']}"
                           f" images, {manifest['num_classes']} classes,"
                           f" {len(manifest['skipped'])} skipped")


if __name__ == "__main__":
    cli()
