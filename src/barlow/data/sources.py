"""Image sources that the convert stage turns into FFCV datasets.

Each source yields a `Source`: an indexable list of (HxWx3 uint8 image, int label)
samples plus class names and the provenance the manifest records; a multi-label source
(PASCAL VOC2007) adds an (N, C) ``targets`` matrix, its label being the row index.
Images are always RGB: grey data (Fashion-MNIST, digits, ELPV) is replicated to three channels so every
data set goes through the same decoders, augmentations and backbones. On such images the
colour augmentations reduce to brightness and contrast (see barlow.augment).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from barlow.progress import Progress

# Decoding a truncated file must fail, not pad the image with grey.
Image.LOAD_TRUNCATED_IMAGES = False


class DataError(ValueError):
    """An input file or folder is missing, unreadable or malformed; the message names it."""


@dataclass
class Source:
    """Samples of one split, ready for ffcv's DatasetWriter."""

    name: str
    split: str
    class_names: list[str]
    labels: np.ndarray                      # (N,) int64
    load: Callable[[int], np.ndarray]       # index -> HxWx3 uint8
    inputs_sha256: str                      # checksum of everything read
    files: list[str] | None = None          # relative paths (ImageFolder, VOC): subset lists
    skipped: list[dict] = field(default_factory=list)
    # Multi-label sources: (N, C) int8 in the VOC devkit's values, 1 present, -1 absent,
    # 0 difficult; ``labels`` is then the row index (an image has no single class).
    targets: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """HxW or HxWx1 grey → HxWx3 uint8 by replicating the channel."""
    if image.ndim == 2:
        image = image[:, :, None]
    return np.ascontiguousarray(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image)


# ---------------------------------------------------------------- Fashion-MNIST (IDX)

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped IDX file (the MNIST format): magic 0x0000 0x08 ndim, then big-endian
    uint32 dimensions, then unsigned bytes."""
    try:
        raw = gzip.decompress(path.read_bytes())
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: not a readable gzip file ({err})") from None
    if len(raw) < 4 or raw[0:2] != b"\x00\x00" or raw[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated: header says {dims}, found {data.size} bytes")
    return data.reshape(dims)


def fashion_mnist(directory: str | Path, split: str) -> Source:
    """Fashion-MNIST from the IDX files of Debian's `dataset-fashion-mnist`, 28×28."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"{directory}: Fashion-MNIST directory not found"
                        " (apt-get install dataset-fashion-mnist, or set data.fashion_mnist_dir)")
    image_file, label_file = (directory / f for f in _IDX_FILES[split])
    images, labels = read_idx(image_file), read_idx(label_file)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DataError(f"{image_file}, {label_file}: shapes {images.shape} and {labels.shape}"
                        " are not N×H×W images with N labels")
    if labels.max() >= len(FASHION_MNIST_CLASSES):
        raise DataError(f"{label_file}: label {labels.max()} outside 0..9")
    digest = hashlib.sha256(image_file.read_bytes() + label_file.read_bytes()).hexdigest()
    return Source("fashion_mnist", split, FASHION_MNIST_CLASSES, labels.astype(np.int64),
                  lambda i: to_rgb(images[i]), digest)


# ---------------------------------------------------------------- in-memory arrays

def split_indices(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: from each class, round(test_fraction·n) indices
    (chosen with `seed`) go to test, the rest to train. Both sorted."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        test.extend(rng.permutation(members)[:round(test_fraction * len(members))])
    test = np.sort(np.asarray(test, dtype=np.int64))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def _array_source(name: str, split: str, images: np.ndarray, labels: np.ndarray,
                  class_names: list[str], test_fraction: float, seed: int) -> Source:
    train, test = split_indices(labels, test_fraction, seed)
    keep = train if split == "train" else test
    images, labels = images[keep], labels[keep].astype(np.int64)
    digest = hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()
    return Source(name, split, class_names, labels, lambda i: to_rgb(images[i]), digest)


def digits(split: str, test_fraction: float, seed: int) -> Source:
    """scikit-learn's 1,797 handwritten digits (8×8, values 0..16 scaled to 0..255)."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    return _array_source("digits", split, images, bunch.target, [str(d) for d in range(10)],
                         test_fraction, seed)


ELPV_CLASSES = ["defect_0", "defect_1/3", "defect_2/3", "defect_1"]


def elpv(split: str, test_fraction: float, seed: int) -> Source:
    """ELPV solar cells (PyPI `elpv-dataset`): 2,624 electroluminescence images, 300×300
    grey; the class is the annotated defect probability {0, 1/3, 2/3, 1}."""
    from elpv_dataset.utils import load_dataset

    images, probabilities, _types = load_dataset()
    labels = np.rint(np.asarray(probabilities) * 3).astype(np.int64)
    return _array_source("elpv", split, images, labels, ELPV_CLASSES, test_fraction, seed)


# ---------------------------------------------------------------- ImageFolder trees

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".ppm"}


def decode_image(path: Path) -> np.ndarray:
    """Fully decode ``path`` to HxWx3 uint8 RGB. Grey, RGBA, CMYK, palette and 16-bit
    images are converted; anything unreadable raises DataError naming the file."""
    try:
        if path.stat().st_size == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as img:
            img.load()  # verify() misses truncation; a full decode does not
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                # 16/32-bit grey: map the 16-bit range 0..65535 onto 0..255 (an "I"
                # image whose values fit in 8 bits is kept as it is).
                arr = np.asarray(img, dtype=np.float64)
                hi = 65535.0 if arr.size and arr.max() > 255 else 255.0
                arr = np.clip(np.round(arr * (255.0 / hi)), 0, 255).astype(np.uint8)
                return to_rgb(arr)
            if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
                # Composite on white, as a viewer shows it, instead of dropping alpha.
                rgba = img.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                img = Image.alpha_composite(background, rgba)
            return np.ascontiguousarray(np.asarray(img.convert("RGB"), dtype=np.uint8))
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image file (unrecognised format)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"{path}: corrupt or truncated image ({err})") from None


def _scan_one(path: str) -> tuple[str, str | None, str]:
    """(path, error or None, sha256 of the bytes): decode once to find bad files."""
    p = Path(path)
    try:
        digest = hashlib.sha256(p.read_bytes()).hexdigest()
    except OSError as err:
        return path, f"{p}: unreadable ({err})", ""
    try:
        decode_image(p)
        return path, None, digest
    except DataError as err:
        return path, str(err), digest


def image_folder(root: str | Path, split: str, class_names: Sequence[str] | None,
                 skip_bad: bool, workers: int) -> Source:
    """An ImageNet-layout tree ``root/<class>/<image>``. Every file is decoded once up
    front (in ``workers`` processes) so a bad image stops the run before any output is
    written, or, with ``skip_bad``, is left out and listed in the manifest.
    ``class_names`` (from the train split) fixes the label order of other splits."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: ImageFolder directory not found")
    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    if not found:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image files>)")
    if class_names is None:
        class_names = found
    elif found != list(class_names):
        missing = sorted(set(class_names) - set(found))
        extra = sorted(set(found) - set(class_names))
        raise DataError(f"{root}: class folders differ from the train split's"
                        f" (missing: {missing[:5]}, extra: {extra[:5]})")
    files, labels = [], []
    skipped: list[dict] = []
    for label, name in enumerate(class_names):
        members = sorted(p for p in (root / name).rglob("*") if p.is_file())
        if not members:
            # An empty class would silently shift the meaning of every later label.
            raise DataError(f"{root / name}: empty class folder (no files)")
        for p in members:
            if p.suffix.lower() in IMAGE_SUFFIXES:
                files.append(p)
                labels.append(label)
            elif skip_bad:
                skipped.append({"file": str(p.relative_to(root)), "error": "not an image file name"})
            else:
                raise DataError(f"{p}: not an image file (suffix {p.suffix!r};"
                                f" expected one of {sorted(IMAGE_SUFFIXES)})")
    digest = hashlib.sha256()
    good = _scan(files, root, skip_bad, workers, digest, skipped)
    paths = [files[i] for i in good]
    return Source(f"imagefolder:{root}", split, list(class_names),
                  np.asarray([labels[i] for i in good], dtype=np.int64),
                  lambda i: decode_image(paths[i]), digest.hexdigest(),
                  files=[os.path.relpath(p, root) for p in paths], skipped=skipped)


def _scan(files: list[Path], root: Path, skip_bad: bool, workers: int, digest: Any,
          skipped: list[dict]) -> list[int]:
    """Decode every file once, in ``workers`` processes, so that a bad image stops the
    run before any output is written; return the indices of the readable ones. A bad
    file raises DataError, or with ``skip_bad`` is appended to ``skipped``. ``digest``
    (a hashlib object) takes ``relative path \\0 sha256 \\n`` of every file, in order."""
    progress = Progress(f"scan {root}", len(files), "image")
    results = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        for result in pool.map(_scan_one, map(str, files), chunksize=64):
            results.append(result)
            progress.update(len(results))
    good = []
    for i, (path, error, sha) in enumerate(results):
        rel = os.path.relpath(path, root)
        digest.update(f"{rel}\0{sha}\n".encode())
        if error is None:
            good.append(i)
        elif skip_bad:
            skipped.append({"file": rel, "error": error})
        else:
            raise DataError(error)
    if not good:
        raise DataError(f"{root}: no readable images")
    return good


# ---------------------------------------------------------------- PASCAL VOC2007 devkit

#: The 20 classes in the devkit's order (VOCdevkit/VOCcode/VOCinit.m), which is also the
#: alphabetical order the SSL benchmarks' label matrices use.
VOC07_CLASSES = ["aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
                 "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person",
                 "pottedplant", "sheep", "sofa", "train", "tvmonitor"]
#: Devkit class-file values: 1 present, -1 absent, 0 difficult (only difficult objects).
VOC_LABELS = (1, -1, 0)
_VOC_SPLITS = {"train": "trainval", "test": "test"}


def read_voc_class_file(path: Path) -> dict[str, int]:
    """``<image id> <label>`` per line, label in VOC_LABELS → {image id: label}. A missing
    file, a malformed line or an image listed twice raises DataError naming the file."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DataError(f"{path}: class file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    labels: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or parts[1] not in {str(v) for v in VOC_LABELS}:
            raise DataError(f"{path}, line {number}: expected '<image id> <1|-1|0>',"
                            f" got {line!r}")
        if parts[0] in labels:
            raise DataError(f"{path}, line {number}: image {parts[0]} listed twice")
        labels[parts[0]] = int(parts[1])
    if not labels:
        raise DataError(f"{path}: no images listed")
    return labels


def voc07(root: str | Path, split: str, skip_bad: bool, workers: int) -> Source:
    """PASCAL VOC2007 in the devkit layout: ``root`` is VOCdevkit/VOC2007, holding
    ``JPEGImages/<id>.jpg`` and ``ImageSets/Main/<class>_{trainval,test}.txt``; the
    train split is trainval (5,011 images), the test split test (4,952).

    A multi-label source: ``targets`` (N, 20) int8 holds the class files' values (1
    present, -1 absent, 0 difficult) in VOC07_CLASSES order, rows in image-id order.
    Every class file of a split must list the same images. An image listed but absent
    from JPEGImages/ is always an error (an incomplete extraction would silently change
    the benchmark); a corrupt one stops the run, or with ``skip_bad`` is left out and
    listed in the manifest, as in ``image_folder``."""
    root = Path(root)
    for folder in (root, root / "JPEGImages", root / "ImageSets" / "Main"):
        if not folder.is_dir():
            raise DataError(f"{folder}: folder not found (data.voc07_root must be the"
                            " VOCdevkit/VOC2007 folder, holding JPEGImages/ and"
                            " ImageSets/Main/)")
    class_files = [root / "ImageSets" / "Main" / f"{name}_{_VOC_SPLITS[split]}.txt"
                   for name in VOC07_CLASSES]
    columns = [read_voc_class_file(path) for path in class_files]
    for path, column in zip(class_files[1:], columns[1:]):
        if column.keys() != columns[0].keys():
            # One class file per class: lists that disagree leave some label undefined.
            extra = sorted(column.keys() - columns[0].keys())
            missing = sorted(columns[0].keys() - column.keys())
            raise DataError(f"{path}: lists other images than {class_files[0].name}"
                            f" (extra: {extra[:5]}, missing: {missing[:5]})")
    digest = hashlib.sha256()
    for path in class_files:
        sha = hashlib.sha256(path.read_bytes()).hexdigest()
        digest.update(f"{path.relative_to(root)}\0{sha}\n".encode())
    ids = sorted(columns[0])
    files = [root / "JPEGImages" / f"{image_id}.jpg" for image_id in ids]
    for image_id, file in zip(ids, files):
        if not file.is_file():
            raise DataError(f"{file}: image {image_id} listed in {class_files[0]} is absent")
    skipped: list[dict] = []
    good = _scan(files, root, skip_bad, workers, digest, skipped)
    targets = np.array([[column[ids[i]] for column in columns] for i in good], dtype=np.int8)
    paths = [files[i] for i in good]
    return Source("voc07", split, list(VOC07_CLASSES), np.arange(len(good), dtype=np.int64),
                  lambda i: decode_image(paths[i]), digest.hexdigest(),
                  files=[os.path.relpath(p, root) for p in paths], skipped=skipped,
                  targets=targets)
