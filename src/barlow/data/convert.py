"""Write a `Source` as an FFCV ``.beton`` with a JSON manifest beside it.

Layout of every dataset: ``{'image': RGBImageField, 'label': IntField}``; a multi-label
source (``Source.targets``) adds ``'targets': NDArrayField`` int8 (C,), its label then
being the row index. The file is written under a temporary name and renamed only once
complete (and the manifest after it), so an interrupted conversion never leaves a
valid-looking output; the temporary names are fixed (barlow.interrupt.partial_path), so
the next run replaces what a killed one left, and FFCV's writer processes die with the
stage. A stage trusts a .beton only after ``read_manifest`` checked it against its
manifest (``check_beton``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from barlow.data.sources import DataError, Source, hash_file
from barlow.interrupt import (children_die_with_parent, partial_path,
                              waited_with_children, written_whole)

FIELDS = ("image", "label")
# Up to this size a stage compares a .beton's sha256 with its manifest's on every
# read: about 2 s per GiB on one core (0.54 s for 256 MiB on an AMD EPYC). An ImageNet
# .beton of hundreds of GB would take minutes per stage: it gets the header checks only
# (check_beton), and `dvc status` compares its hash.
FULL_HASH_BYTES = 2**30


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
    ffcv's writer never notices a dead worker and would wait forever. The first error
    is queued for the parent instead (one message, so the queue's pipe never fills
    and blocks a worker), and a 1×1 placeholder is written in its place and in place
    of every later sample, which is then not even loaded (the file is discarded).

    Each image is loaded (decoded) here once: the samples `image_stats` reads have
    their per-channel histograms recorded on the way, in a table of at most
    ``STATS_IMAGES`` rows that the forked workers share with the parent."""

    def __init__(self, source: Source, seed: int):
        import multiprocessing

        self.source, self.seed = source, seed
        fork = multiprocessing.get_context("fork")
        self.errors = fork.SimpleQueue()
        self.failed = fork.Value("b", False)
        self.stats_rows = {int(i): row for row, i in enumerate(stats_sample(len(source)))}
        self.stats = np.frombuffer(fork.RawArray("d", len(self.stats_rows) * STATS_WIDTH),
                                   dtype=np.float64).reshape(-1, STATS_WIDTH)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple:
        np.random.seed((self.seed * 1_000_003 + i) % 2**32)
        targets = self.source.targets
        placeholder = (np.zeros((1, 1, 3), np.uint8), 0)
        if self.failed.value:
            return placeholder if targets is None else (*placeholder, targets[i])
        try:
            image = self.source.load(i)
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an HxWx3 uint8 image, got {image.dtype} {image.shape}")
            if i in self.stats_rows:
                self.stats[self.stats_rows[i]] = image_stats_row(image)
            sample: tuple = (image, int(self.source.labels[i]))
        except Exception as err:  # noqa: BLE001 — reported by write_beton
            with self.failed.get_lock():
                if not self.failed.value:
                    self.failed.value = True
                    self.errors.put(f"{self.source.name} {self.source.split}, image {i}: {err}")
            sample = placeholder
        return sample if targets is None else (*sample, targets[i])


#: Images `image_stats` reads at most, evenly spaced over the data set.
STATS_IMAGES = 10_000
#: A row of the statistics table: Σ and Σ² per channel, pixels, height, width.
STATS_WIDTH = 9


def stats_sample(n: int, max_images: int = STATS_IMAGES) -> np.ndarray:
    """Indices of the images `image_stats` reads: at most ``max_images``, evenly spaced."""
    return np.unique(np.linspace(0, n - 1, num=min(n, max_images)).astype(int))


def image_stats_row(image: np.ndarray) -> np.ndarray:
    """(Σ_c, Σ_c², pixels, height, width) of an HxWx3 uint8 image, c over R, G, B.

    From PIL's 3×256-bin histogram h: Σ_c = Σ_v v·h_c(v), Σ_c² = Σ_v v²·h_c(v), exact
    integers (float64 holds them exactly below 2^53, i.e. for any image up to ~10^11
    pixels), about 30× faster than summing the image in float64 (2.7 against 81 ms for
    500×375 px on the busy 2-core benchmark machine)."""
    from PIL import Image

    hist = np.asarray(Image.fromarray(image).histogram(), dtype=np.int64).reshape(3, 256)
    values = np.arange(256, dtype=np.int64)
    h, w = image.shape[:2]
    return np.concatenate([hist @ values, hist @ values**2, [h * w, h, w]]).astype(np.float64)


def image_stats(rows: np.ndarray) -> dict[str, Any]:
    """Per-channel mean/std in [0, 255] (for normalisation) and the image-size range,
    from the `image_stats_row` rows of the `stats_sample` images:

        mean_c = Σ Σ_c / Σ pixels,   std_c = sqrt(max(Σ Σ_c² / Σ pixels − mean_c², 0))"""
    total, total_sq = rows[:, 0:3].sum(axis=0), rows[:, 3:6].sum(axis=0)
    pixels = rows[:, 6].sum()
    mean = total / pixels
    std = np.sqrt(np.maximum(total_sq / pixels - mean ** 2, 0.0))
    return {"mean": [round(float(m), 4) for m in mean], "std": [round(float(s), 4) for s in std],
            "height": [int(rows[:, 7].min()), int(rows[:, 7].max())],
            "width": [int(rows[:, 8].min()), int(rows[:, 8].max())]}


def write_beton(source: Source, out: str | Path, settings: FfcvSettings, workers: int,
                seed: int = 0) -> dict[str, Any]:
    """Write ``source`` to ``out`` (.beton) and ``out`` with suffix .json (manifest);
    return the manifest. Both appear only when complete."""
    from ffcv.fields import IntField, NDArrayField, RGBImageField
    from ffcv.writer import DatasetWriter

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    manifest_path = out.with_suffix(".json")
    files_path = out.with_suffix(".files.txt")
    for stale in (out, manifest_path, files_path):
        stale.unlink(missing_ok=True)
        partial_path(stale).unlink(missing_ok=True)
    counts = (np.bincount(source.labels, minlength=len(source.class_names))
              if source.targets is None else (source.targets == 1).sum(axis=0))
    empty = [name for name, count in zip(source.class_names, counts) if count == 0]
    if empty:
        # Every label would still be written, one class never: refused, not kept silently.
        raise DataError(f"{source.name} {source.split}: no images of class"
                        f" {', '.join(map(str, empty[:5]))}{' ...' if len(empty) > 5 else ''}"
                        f" ({len(source.skipped)} skipped by data.skip_bad)")
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
    children_die_with_parent()  # the writer's processes, should this one be killed
    samples = _Samples(source, seed)
    with written_whole(out) as tmp:
        writer = DatasetWriter(str(tmp), fields, num_workers=max(1, workers))
        waited_with_children(lambda: writer.from_indexed_dataset(samples, chunksize=256),
                             out, writer.page_size)
        if not samples.errors.empty():
            raise DataError(samples.errors.get())
        beton_sha = hash_file(tmp).hexdigest()
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
            "resolution": image_stats(samples.stats),
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
            with written_whole(files_path) as tmp_files:
                tmp_files.write_text("".join(f + "\n" for f in source.files))
            manifest["files"] = files_path.name
    with written_whole(manifest_path) as tmp_manifest:
        tmp_manifest.write_text(json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    return manifest


def check_beton(beton: str | Path, manifest: dict[str, Any]) -> None:
    """Raise DataError unless ``beton`` is a readable FFCV file with this project's
    fields (image: RGBImageField, label: IntField) that is still the file its manifest
    describes: as many samples, every allocation inside the file and the file ending
    where its allocation table does (a truncated or appended file fails), and, up to
    FULL_HASH_BYTES, the manifest's sha256. The header checks read the header and the
    allocation table (24 bytes per sample: 31 MB for ImageNet's 1.28M), not the images."""
    from ffcv.fields import IntField, RGBImageField
    from ffcv.reader import Reader
    from ffcv.types import ALLOC_TABLE_TYPE

    try:
        reader = Reader(str(beton))
    except Exception as err:  # noqa: BLE001 — ffcv raises assorted errors on bad files
        raise DataError(f"{beton}: not a readable FFCV .beton ({type(err).__name__}: {err})") from None
    expected = {"image": RGBImageField, "label": IntField}
    if any(not isinstance(reader.handlers.get(k), t) for k, t in expected.items()):
        found = {k: type(h).__name__ for k, h in reader.handlers.items()}
        raise DataError(f"{beton}: fields {found}; expected image: RGBImageField,"
                        " label: IntField (re-run the convert stage)")
    rerun = "changed since the convert stage wrote it; re-run the convert stage"
    if reader.num_samples != manifest.get("num_images"):
        raise DataError(f"{beton}: {reader.num_samples} samples, its manifest says"
                        f" {manifest.get('num_images')}: {rerun}")
    size = Path(beton).stat().st_size
    table_start = int(reader.header["alloc_table_ptr"])
    table = reader.alloc_table
    ends = table["ptr"].astype(np.uint64) + table["size"].astype(np.uint64)
    if (size != table_start + len(table) * ALLOC_TABLE_TYPE.itemsize
            or len(table) < reader.num_samples or int(ends.max(initial=0)) > table_start):
        raise DataError(f"{beton}: {size} bytes do not match its header (truncated or"
                        f" appended to?): {rerun}")
    if size <= FULL_HASH_BYTES and hash_file(beton).hexdigest() != manifest.get("beton_sha256"):
        raise DataError(f"{beton}: sha256 differs from its manifest's beton_sha256: {rerun}")


def normalisation(manifest: dict[str, Any]) -> tuple[list[float], list[float]]:
    """Mean and std in 0–1 units from the convert stage's manifest."""
    res = manifest["resolution"]
    return [m / 255 for m in res["mean"]], [max(s, 1e-3) / 255 for s in res["std"]]


def read_manifest(beton: str | Path) -> dict[str, Any]:
    """The manifest beside ``beton``, after checking the .beton against it (check_beton);
    errors name the file. Every stage opens a .beton through this."""
    path = Path(beton).with_suffix(".json")
    if not Path(beton).is_file():
        raise DataError(f"{beton}: FFCV dataset not found (run the convert stage)")
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: manifest missing beside {beton}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: not a manifest (a JSON object) of the convert stage")
    check_beton(beton, manifest)
    return manifest
