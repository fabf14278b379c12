"""Write a `Source` as an FFCV ``.beton`` with a JSON manifest beside it.

Layout of every dataset: ``{'image': RGBImageField, 'label': IntField}``; a multi-label
source (``Source.targets``) adds ``'targets': NDArrayField`` int8 (C,), its label then
being the row index. The file is written under a temporary name and renamed only once
complete (and the manifest after it), so an interrupted conversion never leaves a
valid-looking output.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from barlow.data.sources import DataError, Source

FIELDS = ("image", "label")


@dataclass(frozen=True)
class FfcvSettings:
    """RGBImageField settings (ffcv-imagenet uses proportion, 500, 0.5, 90)."""

    write_mode: str = "raw"            # raw | jpg | proportion | smart
    max_resolution: int | None = None  # longest side after resize; None keeps native size
    compress_probability: float = 0.5  # share stored as JPEG in proportion mode
    jpeg_quality: int = 90


class _Samples:
    """Indexable view for DatasetWriter, run inside ffcv's worker processes.

    The RNG is reseeded per sample so that proportion mode's raw-or-JPEG draw
    (np.random inside ffcv) is the same for a given image whichever worker writes it:
    conversion is reproducible. A sample that cannot be loaded must not kill its worker:
    ffcv's writer never notices a dead worker and would wait forever. Its error is
    queued for the parent instead, and a 1×1 placeholder is written in its place (the
    file is then discarded)."""

    def __init__(self, source: Source, seed: int):
        import multiprocessing

        self.source, self.seed = source, seed
        self.errors = multiprocessing.get_context("fork").SimpleQueue()

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple:
        np.random.seed((self.seed * 1_000_003 + i) % 2**32)
        targets = self.source.targets
        try:
            image = self.source.load(i)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
            sample: tuple = (image, int(self.source.labels[i]))
        except Exception as err:  # noqa: BLE001 — reported by write_beton
            self.errors.put(f"{self.source.name} {self.source.split}, image {i}: {err}")
            sample = (np.zeros((1, 1, 3), np.uint8), 0)
        return sample if targets is None else (*sample, targets[i])


def image_stats(source: Source, max_images: int = 10_000) -> dict[str, Any]:
    """Per-channel mean/std in [0, 255] (for normalisation) and the image-size range,
    from an evenly spaced sample of at most ``max_images`` images."""
    idx = np.linspace(0, len(source) - 1, num=min(len(source), max_images)).astype(int)
    total = np.zeros(3)
    total_sq = np.zeros(3)
    pixels = 0
    heights, widths = [], []
    for i in np.unique(idx):
        img = source.load(int(i)).astype(np.float64)
        heights.append(img.shape[0])
        widths.append(img.shape[1])
        total += img.sum(axis=(0, 1))
        total_sq += (img ** 2).sum(axis=(0, 1))
        pixels += img.shape[0] * img.shape[1]
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean ** 2, 0.0))
    return {"mean": [round(float(m), 4) for m in mean], "std": [round(float(s), 4) for s in std],
            "height": [int(min(heights)), int(max(heights))],
            "width": [int(min(widths)), int(max(widths))]}


def write_beton(source: Source, out: str | Path, settings: FfcvSettings, workers: int,
                seed: int = 0) -> dict[str, Any]:
    """Write ``source`` to ``out`` (.beton) and ``out`` with suffix .json (manifest);
    return the manifest. Both appear only when complete."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = out.with_suffix(".json")
    for stale in (out, manifest_path):
        stale.unlink(missing_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    fields = {
        "image": RGBImageField(write_mode=settings.write_mode,
                               max_resolution=settings.max_resolution,
                               compress_probability=settings.compress_probability,
                               jpeg_quality=settings.jpeg_quality),
        "label": IntField(),
    }
    targets = source.targets
    if targets is not None:
        # Checked here: a wrong row length would crash ffcv's worker, not this process.
        if targets.shape != (len(source), len(source.class_names)):
            raise ValueError(f"{source.name} {source.split}: targets of shape {targets.shape}"
                             f" for {len(source)} images of {len(source.class_names)} classes")
        fields["targets"] = NDArrayField(np.dtype(np.int8), (len(source.class_names),))
    writer = DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
    samples = _Samples(source, seed)
    try:
        writer.from_indexed_dataset(samples, chunksize=256)
        if not samples.errors.empty():
            raise DataError(samples.errors.get())
        beton_sha = hashlib.sha256(tmp.read_bytes()).hexdigest()
        counts = (np.bincount(source.labels, minlength=len(source.class_names))
                  if targets is None else (targets == 1).sum(axis=0))
        manifest = {
            "file": out.name,
            "source": source.name,
            "split": source.split,
            "num_images": len(source),
            "num_classes": len(source.class_names),
            "class_names": source.class_names,
            "class_counts": [int(c) for c in counts],
            "fields": {"image": "RGBImageField (HxWx3 uint8 RGB)", "label": "IntField"},
            "resolution": image_stats(source),
            "ffcv": {"write_mode": settings.write_mode, "max_resolution": settings.max_resolution,
                     "compress_probability": settings.compress_probability,
                     "jpeg_quality": settings.jpeg_quality, "seed": seed},
            "inputs_sha256": source.inputs_sha256,
            "beton_sha256": beton_sha,
            "skipped": source.skipped,
        }
        if targets is not None:
            # Only here, so single-label manifests stay byte-identical to earlier runs.
            manifest["multilabel"] = True
            manifest["fields"]["label"] = "IntField (row index)"
            manifest["fields"]["targets"] = (f"NDArrayField int8 ({targets.shape[1]},):"
                                             " 1 present, -1 absent, 0 difficult")
            manifest["difficult_counts"] = [int(c) for c in (targets == 0).sum(axis=0)]
        if source.files is not None:
            # One relative path per line, in index order: maps subset lists such as
            # SimCLR's 1percent.txt (file names) to indices in the .beton.
            files_path = out.with_suffix(".files.txt")
            files_path.write_text("".join(f + "\n" for f in source.files))
            manifest["files"] = files_path.name
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    tmp_manifest = manifest_path.with_name(f".{manifest_path.name}.tmp-{os.getpid()}")
    tmp_manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp_manifest, manifest_path)
    return manifest


def check_fields(beton: str | Path) -> None:
    """Raise DataError unless ``beton`` is a readable FFCV file with this project's
    fields (image: RGBImageField, label: IntField)."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader

    try:
        handlers = Reader(str(beton)).handlers
    except Exception as err:  # noqa: BLE001 — ffcv raises assorted errors on bad files
        raise DataError(f"{beton}: not a readable FFCV .beton ({type(err).__name__}: {err})") from None
    expected = {"image": RGBImageField, "label": IntField}
    if any(not isinstance(handlers.get(k), t) for k, t in expected.items()):
        found = {k: type(h).__name__ for k, h in handlers.items()}
        raise DataError(f"{beton}: fields {found}; expected image: RGBImageField,"
                        " label: IntField (re-run the convert stage)")


def read_manifest(beton: str | Path) -> dict[str, Any]:
    """The manifest beside ``beton``, after checking the .beton's fields; errors name
    the file."""
    path = Path(beton).with_suffix(".json")
    if not Path(beton).is_file():
        raise DataError(f"{beton}: FFCV dataset not found (run the convert stage)")
    check_fields(beton)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: manifest missing beside {beton}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
