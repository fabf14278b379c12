"""convert: real Fashion-MNIST, a hand-made ImageFolder (with bad files), a synthetic
PASCAL VOC2007 devkit and ImageFolder transfer sets (data.transfer_folders) round-trip
through FFCV; every bad input stops with an error naming the file (and the key)."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from barlow.data import sources
from barlow.data.convert import FfcvSettings, read_manifest, write_beton
from barlow.data.sources import DataError
from conftest import REPO, machine, repo_params

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def read_back(beton: Path) -> tuple[np.ndarray, np.ndarray]:
    """All images (N,H,W,3 uint8) and labels of a fixed-size .beton, in order, through an
    FFCV Loader. The JIT is off: a few hundred images decode in a second without it."""
    from ffcv.fields.decoders import IntDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    try:
        loader = Loader(str(beton), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL, drop_last=False,
                        pipelines={"image": [SimpleRGBImageDecoder()], "label": [IntDecoder()]})
        images, labels = zip(*[(np.array(x), np.array(y)) for x, y in loader])
    finally:
        Compiler.set_enabled(True)
    return np.concatenate(images), np.concatenate(labels).reshape(-1)


def head(source: sources.Source, n: int) -> sources.Source:
    return replace(source, labels=source.labels[:n])


@pytest.mark.skipif(not FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_slice_round_trips(tmp_path):
    source = head(sources.fashion_mnist(FMNIST, "train"), 300)
    manifest = write_beton(source, tmp_path / "fm.beton", FfcvSettings("raw"), workers=2)
    images, labels = read_back(tmp_path / "fm.beton")
    raw = sources.read_idx(FMNIST / "train-images-idx3-ubyte.gz")[:300]
    assert images.shape == (300, 28, 28, 3)
    for c in range(3):  # grey replicated to RGB, pixel for pixel
        np.testing.assert_array_equal(images[..., c], raw)
    np.testing.assert_array_equal(labels, source.labels)
    assert manifest["num_images"] == 300 and manifest["num_classes"] == 10
    assert sum(manifest["class_counts"]) == 300
    assert manifest["resolution"]["height"] == [28, 28]
    assert read_manifest(tmp_path / "fm.beton") == manifest
    assert len(manifest["inputs_sha256"]) == 64


def test_idx_reader_rejects_bad_files(tmp_path):
    bad = tmp_path / "x.gz"
    bad.write_bytes(b"not gzip")
    with pytest.raises(DataError, match="x.gz: not a readable gzip"):
        sources.read_idx(bad)
    bad.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + (10).to_bytes(4, "big") + b"abc"))
    with pytest.raises(DataError, match="truncated"):
        sources.read_idx(bad)
    with pytest.raises(DataError, match="Fashion-MNIST directory not found"):
        sources.fashion_mnist(tmp_path / "absent", "train")


# ---------------------------------------------------------------- ImageFolder

def _rgb(seed: int, size=(12, 10)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.fixture
def tree(tmp_path) -> Path:
    """train/<class>/ with PNGs in every colour mode a user meets, and a non-ASCII name."""
    root = tmp_path / "imagenet" / "train"
    (root / "cat").mkdir(parents=True)
    (root / "dög").mkdir()
    Image.fromarray(_rgb(0)).save(root / "cat" / "rgb.png")
    Image.fromarray(_rgb(1)[..., 0]).save(root / "cat" / "grey.png")
    Image.fromarray(np.dstack([_rgb(2), np.full((12, 10), 255, np.uint8)])).save(
        root / "cat" / "rgba.png")
    Image.fromarray(_rgb(3)).convert("CMYK").save(root / "dög" / "cmyk.jpg", quality=95)
    Image.fromarray((_rgb(4)[..., 0].astype(np.uint16) * 257)).save(root / "dög" / "16bit.png")
    Image.fromarray(_rgb(5)).save(root / "dög" / "ünïcødé 画像.png")
    return root


def test_image_folder_colour_modes_round_trip(tree, tmp_path):
    source = sources.image_folder(tree, "train", None, skip_bad=False, workers=1)
    assert source.class_names == ["cat", "dög"]
    assert sorted(source.files) == sorted(
        str(p.relative_to(tree)) for p in tree.rglob("*.*"))
    manifest = write_beton(source, tmp_path / "out" / "train.beton", FfcvSettings("raw"), 1)
    images, labels = read_back(tmp_path / "out" / "train.beton")
    np.testing.assert_array_equal(labels, source.labels)
    expected = {
        "cat/rgb.png": _rgb(0),
        "cat/grey.png": np.repeat(_rgb(1)[..., :1], 3, axis=2),
        "cat/rgba.png": _rgb(2),                       # opaque alpha: colours unchanged
        "dög/16bit.png": np.repeat(_rgb(4)[..., :1], 3, axis=2),  # 16-bit scaled back to 8
        "dög/ünïcødé 画像.png": _rgb(5),
    }
    for i, rel in enumerate(source.files):
        if rel in expected:
            np.testing.assert_array_equal(images[i], expected[rel], err_msg=rel)
    cmyk = images[source.files.index("dög/cmyk.jpg")].astype(int)
    assert np.abs(cmyk - _rgb(3)).mean() < 40  # lossy JPEG/CMYK, but the same picture
    files = (tmp_path / "out" / manifest["files"]).read_text().splitlines()
    assert files == source.files
    # The statistics come from the writer's own decode (no pass of their own).
    pixels = np.concatenate([source.load(i).reshape(-1, 3) for i in range(len(source))])
    mean = pixels.astype(np.float64).mean(axis=0)
    assert manifest["resolution"]["mean"] == [round(float(m), 4) for m in mean]
    assert manifest["resolution"]["std"] == pytest.approx(pixels.std(axis=0), abs=1e-4)
    assert manifest["resolution"]["height"] == [12, 12]


@pytest.mark.parametrize("name, content, problem, cheap", [
    ("zero.png", b"", "empty file", True),
    ("notes.png", b"this is text, not a picture", "not an image file", False),
    ("readme.txt", b"hello", "not an image file", True),
    ("cut.png", None, "corrupt or truncated", False),
    ("cut.jpg", None, "corrupt or truncated", False),
])
def test_bad_files_are_named(tree, tmp_path, name, content, problem, cheap):
    path = tree / "cat" / name
    if content is None:  # a real PNG or JPEG cut in half
        full = tree / "cat" / f"full{path.suffix}"
        Image.fromarray(_rgb(9, (64, 64))).save(full)
        content = full.read_bytes()[: len(full.read_bytes()) // 2]
        full.unlink()
    path.write_bytes(content)
    out = tmp_path / "out" / "train.beton"
    with pytest.raises(DataError, match=problem) as err:
        # A name or size tells at once; a bad picture only the writer's decode, which
        # stops on it and writes nothing.
        source = sources.image_folder(tree, "train", None, skip_bad=False, workers=1)
        assert not cheap, "found only after listing"
        write_beton(source, out, FfcvSettings("raw"), workers=2)
    assert name in str(err.value)
    assert not out.parent.exists() or list(out.parent.iterdir()) == []
    # skip_bad leaves it out and lists it.
    source = sources.image_folder(tree, "train", None, skip_bad=True, workers=1)
    assert [s["file"] for s in source.skipped] == [f"cat/{name}"]
    assert f"cat/{name}" not in source.files


def test_scan_in_slices_gives_the_same_source(tree, monkeypatch):
    (tree / "dög" / "broken.png").write_bytes(b"text, not a picture")
    whole = sources.image_folder(tree, "train", None, skip_bad=True, workers=2)
    monkeypatch.setattr(sources, "_SCAN_SLICE", 2)
    sliced = sources.image_folder(tree, "train", None, skip_bad=True, workers=2)
    assert sliced.files == whole.files and sliced.skipped == whole.skipped
    assert sliced.inputs_sha256 == whole.inputs_sha256
    np.testing.assert_array_equal(sliced.labels, whole.labels)
    assert len(whole.files) == 6 and whole.skipped[0]["file"] == "dög/broken.png"


def test_folder_level_errors(tree, tmp_path):
    (tree / "empty").mkdir()
    with pytest.raises(DataError, match="empty class folder") as err:
        sources.image_folder(tree, "train", None, skip_bad=True, workers=1)
    assert "empty" in str(err.value)
    with pytest.raises(DataError, match="ImageFolder directory not found"):
        sources.image_folder(tmp_path / "nowhere", "train", None, False, 1)
    (tree / "empty").rmdir()
    with pytest.raises(DataError, match="differ from the train split"):
        sources.image_folder(tree, "test", ["cat", "dög", "eel"], False, 1)


def test_failed_write_leaves_no_output(tree, tmp_path):
    source = sources.image_folder(tree, "train", None, skip_bad=False, workers=1)
    out = tmp_path / "out" / "train.beton"
    broken = replace(source, load=lambda i: np.zeros((4, 4), np.uint8))  # not HxWx3
    with pytest.raises(DataError, match=r"image 0: expected an HxWx3 uint8 image"):
        write_beton(broken, out, FfcvSettings("raw"), workers=2)
    assert list(out.parent.iterdir()) == []

    def flaky(i):  # a failure inside ffcv's worker process must not hang the writer
        if i == 3:
            raise OSError("disk read failed")
        return source.load(i)

    with pytest.raises(DataError, match="image 3: disk read failed"):
        write_beton(replace(source, load=flaky), out, FfcvSettings("raw"), workers=2)
    assert list(out.parent.iterdir()) == []


def test_proportion_mode_is_reproducible(tree, tmp_path):
    source = sources.image_folder(tree, "train", None, skip_bad=False, workers=1)
    settings = FfcvSettings("proportion", max_resolution=500, compress_probability=0.5)
    a = write_beton(source, tmp_path / "a.beton", settings, workers=2, seed=3)
    b = write_beton(source, tmp_path / "b.beton", settings, workers=1, seed=3)
    assert a["beton_sha256"] == b["beton_sha256"]


# ---------------------------------------------------------------- transfer sets

def test_transfer_sources_are_stratified_and_disjoint():
    train, test = sources.digits("train", 0.25, 0), sources.digits("test", 0.25, 0)
    assert len(train) + len(test) == 1797
    ratio = np.bincount(test.labels) / np.bincount(np.concatenate([train.labels, test.labels]))
    assert np.allclose(ratio, 0.25, atol=0.02)
    img = train.load(0)
    assert img.shape == (8, 8, 3) and img.dtype == np.uint8 and img.max() > 200


# ---------------------------------------------------------------- the stage itself

def run_convert(tmp_path: Path, params: dict, *args: str,
                preexec_fn=None) -> subprocess.CompletedProcess:
    import yaml

    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(repo_params(**{"machine": machine(1), **params})))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "stages.convert", *args, "--params",
                           str(tmp_path / "params.yaml")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=preexec_fn)


@pytest.mark.slow
@pytest.mark.parametrize("data, message", [
    ({"sourc": "fashion_mnist"}, "data.sourc: unknown key"),
    ({"source": "cifar"}, "data.source: 'cifar' is not one of"),
    ({"seed": "zero"}, "data.seed: expected an integer"),
    ({"transfer_test_fraction": "0.25"}, "write numbers unquoted"),
    ({"ffcv": {"compress_probability": 1.5}}, "data.ffcv.compress_probability: 1.5 is not a"),
    ({"source": "imagefolder"}, "data.imagefolder_root: must be set"),
    ({"source": "imagefolder", "imagefolder_root": "/nonexistent"}, "/nonexistent/train"),
    ({"voc07_resolution": 4}, "data.voc07_resolution: must be >= 8"),
])
def test_stage_rejects_bad_params_before_work(tmp_path, data, message):
    out = tmp_path / "ffcv"
    result = run_convert(tmp_path, {"data": data}, "dataset", "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.slow
def test_stage_converts_an_imagefolder_tree(tree, tmp_path):
    (tree.parent / "val" / "cat").mkdir(parents=True)
    (tree.parent / "val" / "dög").mkdir()
    Image.fromarray(_rgb(7)).save(tree.parent / "val" / "cat" / "v.png")
    Image.fromarray(_rgb(8)).save(tree.parent / "val" / "dög" / "w.png")
    (tree / "cat" / "broken.png").write_bytes(b"")
    data = {"source": "imagefolder", "imagefolder_root": str(tree.parent)}
    out = tmp_path / "ffcv"
    result = run_convert(tmp_path, {"data": data}, "dataset", "--out", str(out))
    assert result.returncode == 2 and "broken.png: empty file" in result.stderr
    assert not (out / "train.beton").exists()
    result = run_convert(tmp_path, {"data": {**data, "skip_bad": True}}, "dataset", "--out", str(out))
    assert result.returncode == 0, result.stderr
    manifest = json.loads((out / "train.json").read_text())
    assert manifest["num_images"] == 6 and manifest["skipped"][0]["file"] == "cat/broken.png"
    assert manifest["ffcv"]["write_mode"] == "proportion"
    assert json.loads((out / "test.json").read_text())["class_counts"] == [1, 1]


@pytest.mark.slow
def test_a_writer_process_the_file_system_refuses_ends_the_stage(tree, tmp_path):
    """FFCV's writer processes write the .beton's pages, and its writer waits for them
    blindly. A file-size limit (`ulimit -f`, a batch system's) ends the first page's
    writer with SIGXFSZ, as a full disk ends it with ENOSPC: the stage stops in one line
    naming the file, exit 5, instead of waiting forever, and leaves no .beton."""
    import resource

    for split in ("cat", "dög"):
        (tree.parent / "val" / split).mkdir(parents=True)
        Image.fromarray(_rgb(7)).save(tree.parent / "val" / split / "v.png")
    limit = 256 * 1024  # the header and the samples' metadata fit; a page does not

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "ffcv"
    result = run_convert(tmp_path, {"data": {"source": "imagefolder",
                                             "imagefolder_root": str(tree.parent)}},
                         "dataset", "--out", str(out), preexec_fn=limited)
    assert result.returncode == 5, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1] == (
        f"convert: error: {out / 'train.beton'}: cannot write: file too large for this"
        " process or file system")
    assert [p.name for p in out.iterdir()] == []


@pytest.mark.slow
def test_stage_stops_on_the_first_of_many_bad_images(tree, tmp_path):
    """The writer's workers report one error, not one per bad file: hundreds of
    messages would fill the queue's pipe and block a worker, and the writer would wait
    for it forever (the subprocess's timeout turns such a hang into a failure)."""
    for i in range(600):
        (tree / "cat" / f"bad{i:03d}.png").write_bytes(b"text, not a picture")
    for split in ("cat", "dög"):
        (tree.parent / "val" / split).mkdir(parents=True)
        Image.fromarray(_rgb(7)).save(tree.parent / "val" / split / "v.png")
    data = {"source": "imagefolder", "imagefolder_root": str(tree.parent)}
    out = tmp_path / "ffcv"
    result = run_convert(tmp_path, {"data": data, "machine": machine(1, cores=2)}, "dataset",
                         "--out", str(out))
    assert result.returncode == 2, result.stderr
    assert re.search(r"cat/bad\d{3}\.png: not an image file", result.stderr)
    assert not (out / "train.beton").exists()


def test_beton_with_wrong_fields_is_refused(tmp_path):
    from ffcv.fields import FloatField, RGBImageField
    from ffcv.writer import DatasetWriter

    path = tmp_path / "odd.beton"
    writer = DatasetWriter(str(path), {"img": RGBImageField(), "y": FloatField()}, num_workers=1)
    writer.from_indexed_dataset([(np.zeros((4, 4, 3), np.uint8), 0.5)])
    path.with_suffix(".json").write_text("{}")
    with pytest.raises(DataError, match=r"odd.beton: fields \{'img': 'RGBImageField', 'y': 'FloatField'\}"):
        read_manifest(path)
    path.write_bytes(b"garbage" * 10)
    with pytest.raises(DataError, match="odd.beton: not a readable FFCV .beton"):
        read_manifest(path)


# ---------------------------------------------------------------- PASCAL VOC2007 devkit

@pytest.fixture
def devkit(tmp_path) -> tuple[Path, dict]:
    """(VOCdevkit/VOC2007 folder, {devkit split: (ids, labels)}) of voc_devkit."""
    from voc_devkit import make_devkit

    truth = make_devkit(tmp_path)
    return tmp_path / "VOCdevkit" / "VOC2007", truth


def read_multilabel(beton: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Images, labels and targets of a fixed-size multi-label .beton, in order (JIT off,
    as in read_back)."""
    from ffcv.fields.decoders import IntDecoder, NDArrayDecoder, SimpleRGBImageDecoder
    from ffcv.loader import Loader, OrderOption
    from ffcv.pipeline.compiler import Compiler

    Compiler.set_enabled(False)
    try:
        loader = Loader(str(beton), batch_size=64, num_workers=1, order=OrderOption.SEQUENTIAL,
                        drop_last=False, pipelines={"image": [SimpleRGBImageDecoder()],
                                                    "label": [IntDecoder()],
                                                    "targets": [NDArrayDecoder()]})
        batches = [[np.array(field) for field in batch] for batch in loader]
    finally:
        Compiler.set_enabled(True)
    return tuple(np.concatenate(part) for part in zip(*batches))


def test_voc07_reader_parses_the_class_files(devkit):
    root, truth = devkit
    for split, devkit_split in (("train", "trainval"), ("test", "test")):
        source = sources.voc07(root, split, skip_bad=False, workers=1)
        ids, labels = truth[devkit_split]
        assert source.class_names == sources.VOC07_CLASSES and len(source.class_names) == 20
        assert source.files == [f"JPEGImages/{i}.jpg" for i in ids]
        np.testing.assert_array_equal(source.targets, labels)
        assert source.targets.dtype == np.int8 and set(np.unique(labels)) == {-1, 0, 1}
        np.testing.assert_array_equal(source.labels, np.arange(len(ids)))  # row index
        assert source.load(0).shape == (40, 40, 3)
    # The checksum covers the class files: one changed label changes it.
    before = sources.voc07(root, "train", False, 1).inputs_sha256
    cow = root / "ImageSets" / "Main" / "cow_trainval.txt"
    lines = cow.read_text().splitlines()
    lines[0] = lines[0][:-2] + ("-1" if lines[0].endswith(" 1") else " 1")
    cow.write_text("\n".join(lines) + "\n")
    assert sources.voc07(root, "train", False, 1).inputs_sha256 != before


def _drop_first_line(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[1:]))


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "JPEGImages").rename(root / "jpegs"), "JPEGImages: folder not found"),
    (lambda root: (root / "ImageSets" / "Main" / "cow_test.txt").unlink(),
     "cow_test.txt: class file not found"),
    (lambda root: (root / "ImageSets" / "Main" / "dog_test.txt").write_text(
        "001000  1\n001001 2\n"), "dog_test.txt, line 2: expected '<image id> <1|-1|0>'"),
    (lambda root: (root / "ImageSets" / "Main" / "bus_test.txt").write_text(
        "001000  1 extra\n"), "bus_test.txt, line 1: expected"),
    (lambda root: _drop_first_line(root / "ImageSets" / "Main" / "sofa_test.txt"),
     "sofa_test.txt: lists other images than aeroplane_test.txt (extra: [], missing: ['001000'])"),
    (lambda root: (root / "JPEGImages" / "001003.jpg").unlink(),
     "001003.jpg: image 001003 listed in"),
])
def test_voc07_reader_errors_name_the_file(devkit, damage, message):
    root, _ = devkit
    damage(root)
    with pytest.raises(DataError, match=re.escape(message)):
        sources.voc07(root, "test", skip_bad=True, workers=1)
    with pytest.raises(DataError, match="VOC2007/nowhere: folder not found"):
        sources.voc07(root / "nowhere", "test", False, 1)


def test_voc07_corrupt_image_stops_or_is_skipped(devkit, tmp_path):
    root, truth = devkit
    jpeg = root / "JPEGImages" / "000004.jpg"
    jpeg.write_bytes(jpeg.read_bytes()[: jpeg.stat().st_size // 2])
    with pytest.raises(DataError, match="000004.jpg: corrupt or truncated"):
        write_beton(sources.voc07(root, "train", skip_bad=False, workers=1),
                    tmp_path / "voc07_train.beton", FfcvSettings("raw"), 1)
    assert not (tmp_path / "voc07_train.beton").exists()
    source = sources.voc07(root, "train", skip_bad=True, workers=1)
    assert source.skipped[0]["file"] == "JPEGImages/000004.jpg" and len(source) == 59
    np.testing.assert_array_equal(source.targets, np.delete(truth["trainval"][1], 4, axis=0))


def test_voc07_round_trips_byte_identically(devkit, tmp_path):
    root, truth = devkit
    source = sources.voc07(root, "test", skip_bad=False, workers=1)
    settings = FfcvSettings("raw", max_resolution=32)
    manifest = write_beton(source, tmp_path / "a" / "voc07_test.beton", settings, 1)
    images, rows, targets = read_multilabel(tmp_path / "a" / "voc07_test.beton")
    np.testing.assert_array_equal(targets, truth["test"][1])
    np.testing.assert_array_equal(rows.reshape(-1), np.arange(40))
    assert images.shape == (40, 32, 32, 3)  # 40 px JPEGs stored at 32
    assert read_manifest(tmp_path / "a" / "voc07_test.beton") == manifest
    assert manifest["multilabel"] is True and manifest["num_classes"] == 20
    assert manifest["class_counts"] == [int(c) for c in (truth["test"][1] == 1).sum(axis=0)]
    assert manifest["difficult_counts"] == [int(c) for c in (truth["test"][1] == 0).sum(axis=0)]
    files = (tmp_path / "a" / manifest["files"]).read_text().splitlines()
    assert files == [f"JPEGImages/{i}.jpg" for i in truth["test"][0]]
    again = write_beton(sources.voc07(root, "test", False, 1),
                        tmp_path / "b" / "voc07_test.beton", settings, 1)
    assert again["beton_sha256"] == manifest["beton_sha256"]


def test_repo_params_skip_voc07():
    from barlow.config import DataConfig, load_section

    assert load_section(DataConfig, "data", REPO / "params.yaml").voc07_root == ""


@pytest.fixture
def convert_transfer(tmp_path, monkeypatch):
    """The convert_transfer command as run(data params, out folder), its offline sets
    swapped for tiny ones."""
    import yaml
    from click.testing import CliRunner

    from conftest import tiny_source
    from stages import convert

    for name in ("digits", "elpv"):
        monkeypatch.setattr(sources, name, lambda split, *_, name=name:
                            replace(tiny_source(split, 8, 0), name=name))

    def run(data: dict, out: Path):
        (tmp_path / "params.yaml").write_text(yaml.safe_dump(repo_params(data=data,
                                                                         machine=machine(1))))
        args = ["transfer", "--params", str(tmp_path / "params.yaml"), "--out", str(out)]
        return CliRunner().invoke(convert.cli, args)

    return run


def test_stage_converts_voc07_when_its_root_is_set(devkit, tmp_path, convert_transfer):
    root, truth = devkit
    run = convert_transfer
    result = run({}, tmp_path / "offline")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "offline").glob("*.beton")) == [
        "digits_test.beton", "digits_train.beton", "elpv_test.beton", "elpv_train.beton"]
    result = run({"voc07_root": str(root), "voc07_resolution": 24},
                 tmp_path / "with_voc")
    assert result.exit_code == 0, result.output
    assert "convert_transfer: voc07 test: 40 images, 20 classes, 0 skipped" in result.output
    for split, devkit_split in (("train", "trainval"), ("test", "test")):
        beton = tmp_path / "with_voc" / f"voc07_{split}.beton"
        np.testing.assert_array_equal(read_multilabel(beton)[2], truth[devkit_split][1])
        assert read_manifest(beton)["ffcv"]["max_resolution"] == 24
    # A broken test split stops the stage before anything is written.
    (root / "ImageSets" / "Main" / "cat_test.txt").unlink()
    result = run({"voc07_root": str(root)}, tmp_path / "broken")
    assert result.exit_code == 2 and "cat_test.txt: class file not found" in result.stderr
    assert not (tmp_path / "broken").exists()


# ---------------------------------------------------------------- ImageFolder transfer sets

#: Class folder -> the colour of its images; labels follow the sorted folder names.
SCENES = {"desert": (200, 30, 30), "forest": (30, 200, 30), "harbour": (30, 30, 200)}


def scene_tree(root: Path, per_class: dict[str, int] | None = None) -> Path:
    """An ImageFolder tree root/{train,val}/<class>/*.png (per split: images per class,
    default 4 train, 2 val) of 16×12 images, each a class's colour plus noise: the
    label can be read back from the pixels."""
    rng = np.random.default_rng(0)
    for split, n in (per_class or {"train": 4, "val": 2}).items():
        for name, colour in SCENES.items():
            (root / split / name).mkdir(parents=True)
            for i in range(n):
                noise = rng.integers(0, 40, (16, 12, 3))
                Image.fromarray((np.asarray(colour) + noise).astype(np.uint8)).save(
                    root / split / name / f"{i}.png")
    return root


def test_stage_converts_transfer_folders(tmp_path, convert_transfer):
    root = scene_tree(tmp_path / "scenes")
    data = {"transfer_folders": {"scenes": str(root)}, "ffcv": {"jpeg_quality": 80}}
    result = convert_transfer(data, tmp_path / "out")
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "convert_transfer: scenes test: 6 images, 3 classes, 0 skipped" in result.output
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("*.beton")) == [
        f"{name}_{split}.beton" for name in ("digits", "elpv", "scenes")
        for split in ("test", "train")]
    for split, n, folder in (("train", 4, "train"), ("test", 2, "val")):
        manifest = read_manifest(out / f"scenes_{split}.beton")
        assert manifest["class_names"] == list(SCENES) and manifest["class_counts"] == [n] * 3
        assert manifest["source"] == f"imagefolder:{root / folder}"
        assert manifest["ffcv"] == {"write_mode": "proportion", "max_resolution": 500,
                                    "compress_probability": 0.5, "jpeg_quality": 80, "seed": 0}
        images, labels = read_back(out / f"scenes_{split}.beton")
        np.testing.assert_array_equal(labels, np.repeat(np.arange(3), n))
        # Each image still shows its class's colour (JPEG or raw, as proportion drew).
        np.testing.assert_array_equal(images.mean(axis=(1, 2)).argmax(axis=1), labels)
    # Byte-identical on a rerun (one writer), and the offline sets as without folders.
    convert_transfer(data, tmp_path / "again")
    convert_transfer({}, tmp_path / "offline")
    for name in ("scenes_train.beton", "scenes_test.json"):
        assert (out / name).read_bytes() == (tmp_path / "again" / name).read_bytes()
    for name in ("digits_train.beton", "digits_test.json", "elpv_train.beton"):
        assert (out / name).read_bytes() == (tmp_path / "offline" / name).read_bytes()


@pytest.mark.parametrize("damage, folders, message", [
    (None, {"scenes": "{tmp}/nowhere"},
     "data.transfer_folders.scenes: {tmp}/nowhere/train: ImageFolder directory not found"),
    (lambda root: shutil.rmtree(root / "val"), {"scenes": "{root}"},
     "data.transfer_folders.scenes: {root}/val: ImageFolder directory not found"),
    (lambda root: (root / "train" / "glacier").mkdir(), {"scenes": "{root}"},
     "data.transfer_folders.scenes: {root}/train/glacier: empty class folder"),
    (lambda root: shutil.rmtree(root / "val" / "forest"), {"scenes": "{root}"},
     "data.transfer_folders.scenes: {root}/val: class folders differ from the train split's"
     " (missing: ['forest']"),
    (None, {"my scenes": "{root}"}, "data.transfer_folders.my scenes: a name must be letters"),
    (None, {"elpv": "{root}"},
     "data.transfer_folders.elpv: 'elpv' is a set convert_transfer writes itself"),
    (None, {"scenes": ""}, "data.transfer_folders.scenes: must be the root of an ImageFolder"),
    (None, {"scenes": 3}, "data.transfer_folders.scenes: expected a string"),
    (None, ["scenes"], "data.transfer_folders: expected a mapping"),
])
def test_transfer_folder_errors_name_key_and_folder(tmp_path, convert_transfer, damage,
                                                    folders, message):
    root = scene_tree(tmp_path / "scenes")
    if damage is not None:
        damage(root)

    def fill(text):
        return text.format(tmp=tmp_path, root=root) if isinstance(text, str) else text

    if isinstance(folders, dict):
        folders = {name: fill(path) for name, path in folders.items()}
    result = convert_transfer({"transfer_folders": folders}, tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert fill(message) in result.stderr, result.stderr
    assert not (tmp_path / "out").exists()  # every tree is read before anything is written


def test_repo_params_convert_no_transfer_folders():
    from barlow.config import DataConfig, load_section

    assert load_section(DataConfig, "data", REPO / "params.yaml").transfer_folders == {}
