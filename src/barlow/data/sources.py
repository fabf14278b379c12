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
import io
import os
import struct
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError

from barlow.errors import BadInput
from barlow.progress import Progress

# Decoding a truncated file must fail, not pad the image with grey.
Image.LOAD_TRUNCATED_IMAGES = False



class DataError(BadInput):
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


def hash_file(path: str | Path, digest: Any = None) -> Any:
    """``digest`` (a hashlib object; a new sha256 when None) updated with the bytes of
    ``path``, read in 1 MiB pieces: no checksum holds a whole file in memory."""
    digest = hashlib.sha256() if digest is None else digest
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest


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
    digest = hash_file(label_file, hash_file(image_file))
    return Source("fashion_mnist", split, FASHION_MNIST_CLASSES, labels.astype(np.int64),
                  lambda i: to_rgb(images[i]), digest.hexdigest())


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
    digest = hashlib.sha256(np.ascontiguousarray(images))
    digest.update(np.ascontiguousarray(labels))
    return Source(name, split, class_names, labels, lambda i: to_rgb(images[i]),
                  digest.hexdigest())


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


def decode_image(path: Path, data: bytes | None = None) -> np.ndarray:
    """Fully decode ``path`` (or ``data``, its bytes already read) to HxWx3 uint8 RGB.
    Grey, RGBA, CMYK, palette and 16-bit images are converted; anything unreadable
    raises DataError naming the file."""
    try:
        if (len(data) if data is not None else path.stat().st_size) == 0:
            raise DataError(f"{path}: empty file (0 bytes)")
        with Image.open(path if data is None else io.BytesIO(data)) as img:
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


def _hash_one(path: str) -> tuple[bytes, str | None]:
    """(sha256 of the file's bytes; None or the read error)."""
    try:
        return hash_file(path).digest(), None
    except OSError as err:
        return b"", f"{path}: unreadable ({err})"


def _decode_one(path: str) -> tuple[bytes, str | None]:
    """(sha256 of the file's bytes, None or why it does not decode): one read serves
    both."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError as err:
        return b"", f"{p}: unreadable ({err})"
    try:
        decode_image(p, data)
        return hashlib.sha256(data).digest(), None
    except DataError as err:
        return hashlib.sha256(data).digest(), str(err)


def image_folder(root: str | Path, split: str, class_names: Sequence[str] | None,
                 skip_bad: bool, workers: int) -> Source:
    """An ImageNet-layout tree ``root/<class>/<image>``; ``class_names`` (from the train
    split) fixes the label order of other splits.

    The checks that need no decoding come first and stop the run in seconds: class
    folders present and equal to the train split's, none empty, every file with an
    image suffix and not empty. Then every file is read once, in ``workers``
    processes, for the inputs checksum. Images are decoded only by the writer
    (`barlow.data.convert.write_beton`), which stops on the first bad one and writes
    nothing. With ``skip_bad`` the bad files must be known before the writer fixes
    the indices, so the read also decodes (a second decode of every image) and a bad
    file is left out and listed in the manifest."""
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
    files: list[str] = []  # relative paths: the per-image memory is one short string
    labels = []
    skipped: list[dict] = []
    for label, name in enumerate(class_names):
        members = sorted(p for p in (root / name).rglob("*") if p.is_file())
        if not members:
            # An empty class would silently shift the meaning of every later label.
            raise DataError(f"{root / name}: empty class folder (no files)")
        for p in members:
            rel = os.path.relpath(p, root)
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                problem = (f"{p}: not an image file (suffix {p.suffix!r};"
                           f" expected one of {sorted(IMAGE_SUFFIXES)})")
            elif p.stat().st_size == 0:
                problem = f"{p}: empty file (0 bytes)"
            else:
                files.append(rel)
                labels.append(label)
                continue
            if not skip_bad:
                raise DataError(problem)
            skipped.append({"file": rel, "error": problem})
    digest = hashlib.sha256()
    good = _scan(files, root, skip_bad, workers, digest, skipped)
    if len(good) < len(files):
        files = [files[i] for i in good]
        labels = [labels[i] for i in good]
    return Source(f"imagefolder:{root}", split, list(class_names),
                  np.asarray(labels, dtype=np.int64),
                  lambda i: decode_image(root / files[i]), digest.hexdigest(),
                  files=files, skipped=skipped)


_SCAN_SLICE = 16_384


def _scan(files: list[str], root: Path, decode: bool, workers: int, digest: Any,
          skipped: list[dict]) -> list[int]:
    """Read every file (``root``/relative path) once, in ``workers`` processes, and
    feed ``relative path \\0 sha256 \\n`` of each, in order, to ``digest`` (a hashlib
    object); return the indices of the files to keep. With ``decode`` each file is
    also decoded from the bytes read: a bad one is appended to ``skipped`` and left
    out. Work is queued and results consumed in slices, so memory does not grow with
    the number of files beyond the lists themselves."""
    work = _decode_one if decode else _hash_one
    progress = Progress(f"scan {root}", len(files), "image")
    good = []
    with ProcessPoolExecutor(max_workers=max(1, workers)) as pool:
        # Executor.map submits all its work at once: in slices, the queued paths and
        # results stay bounded whatever the number of files.
        for start in range(0, len(files), _SCAN_SLICE):
            rels = files[start:start + _SCAN_SLICE]
            results = pool.map(work, [str(root / f) for f in rels], chunksize=64)
            for i, (rel, (sha, error)) in enumerate(zip(rels, results), start=start):
                digest.update(f"{rel}\0{sha.hex()}\n".encode())
                if error is None:
                    good.append(i)
                elif decode:
                    skipped.append({"file": rel, "error": error})
                else:
                    raise DataError(error)
                progress.update(i + 1)
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
    the benchmark); a corrupt one stops the writer, or with ``skip_bad`` is left out
    and listed in the manifest, as in ``image_folder``."""
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
        sha, error = _hash_one(str(path))
        if error:
            raise DataError(error)
        digest.update(f"{path.relative_to(root)}\0{sha.hex()}\n".encode())
    ids = sorted(columns[0])
    files = [os.path.join("JPEGImages", f"{image_id}.jpg") for image_id in ids]
    for image_id, file in zip(ids, files):
        if not (root / file).is_file():
            raise DataError(f"{root / file}: image {image_id} listed in {class_files[0]}"
                            " is absent")
    skipped: list[dict] = []
    good = _scan(files, root, skip_bad, workers, digest, skipped)
    targets = np.array([[column[ids[i]] for column in columns] for i in good], dtype=np.int8)
    files = [files[i] for i in good]
    return Source("voc07", split, list(VOC07_CLASSES), np.arange(len(good), dtype=np.int64),
                  lambda i: decode_image(root / files[i]), digest.hexdigest(),
                  files=files, skipped=skipped, targets=targets)
