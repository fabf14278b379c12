"""loaders: two views of the same images through FFCV (compiled and as plain Python),
round trips with the augmentations off, normalisation, shapes, order, labels, subsets.

Every compiled Loader costs a numba compile (≈12–20 s for the two-view pipeline), so only
three are compiled here (two identical two-view loaders, to check that the same seed
gives bit-identical batches, and one evaluation loader); the others run with ffcv's
compiler off.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from ffcv.fields import IntField, RGBImageField
from ffcv.pipeline.compiler import Compiler
from ffcv.writer import DatasetWriter

from barlow.augment import CROP_UNIFORMS, crop_box, uniforms
from barlow.data.loaders import (ViewSpec, batches_per_epoch, eval_loader, paper_views,
                                 pretrain_loader, progressive_resolution, view_operations)

# numba's dispatcher finalisers raise a harmless KeyError when loaders are collected.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


class Arrays:
    """An indexed dataset over (N, H, W, 3) uint8 images and int labels."""

    def __init__(self, images, labels):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], int(self.labels[i])


def write(path, images, labels):
    writer = DatasetWriter(str(path), {"image": RGBImageField(write_mode="raw"), "label": IntField()},
                           num_workers=1)
    writer.from_indexed_dataset(Arrays(images, labels))
    return str(path)


@pytest.fixture(scope="session")
def square(tmp_path_factory):
    """64 random colour 28×28 images, labels 7i mod 10."""
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 3), dtype=np.uint8)
    labels = (np.arange(64) * 7) % 10
    return write(tmp_path_factory.mktemp("beton") / "square.beton", images, labels), images, labels


@pytest.fixture(scope="session")
def wide(tmp_path_factory):
    """40 structured 40×48 (H×W) images: ramps that make crops and flips visible."""
    y, x = np.mgrid[0:40, 0:48]
    images = np.stack([np.stack([(x * 5 + k) % 256, (y * 6) % 256, np.full_like(x, 3 * k)], -1)
                       for k in range(40)]).astype(np.uint8)
    labels = np.arange(40) % 4
    return write(tmp_path_factory.mktemp("beton") / "wide.beton", images, labels), images, labels


@contextmanager
def python_mode():
    """ffcv's compiler off: operations run as plain Python (fast to start, slow to run)."""
    Compiler.set_enabled(False)
    try:
        yield
    finally:
        Compiler.set_enabled(True)


def to_uint8(views, mean=MEAN, std=STD):
    """Undo the normalisation: (B, 3, H, W) float → (B, H, W, 3) values in [0, 255]."""
    x = views.permute(0, 2, 3, 1).double().numpy()
    return x * np.asarray(std) * 255 + np.asarray(mean) * 255


def collect(loader):
    """All batches of one epoch, copied out of ffcv's reused buffers."""
    return [tuple(t.clone() for t in batch) for batch in loader]


def reference_views(images, order, batch_size, view, seed, view_index):
    """The view's uint8 operations applied, as plain Python, batch by batch in ``order``."""
    with python_mode():
        code = [(op, op.generate_code()) for op in view_operations(view, seed, view_index)[1:]]
        out = []
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start:start + batch_size]
            batch = images[idx].copy()
            for op, run in code:
                scratch = np.empty(batch.shape, np.float32) if op.needs_scratch else None
                batch = run(batch, scratch, idx)
            out.append(batch)
    return np.concatenate(out)


IDENTITY_CROP = dict(resolution=28, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0), flip_p=0.0)


PAPER_SEED, PAPER_BATCH = 3, 16


def paper_views_28():
    """The paper's two views at 28 px (full crop range, flip, jitter, grey, blur, solarise)."""
    return tuple(replace(v, blur_sigma=(0.5, 1.5)) for v in paper_views(28))


@pytest.fixture(scope="module")
def paper_epochs(square):
    """Two epochs of the compiled two-view loader with the complete paper augmentation."""
    loader = pretrain_loader(square[0], PAPER_BATCH, 2, paper_views_28(), MEAN, STD,
                             seed=PAPER_SEED)
    return [collect(loader), collect(loader)]


@pytest.mark.slow
def test_compiled_two_views_match_python_and_change_every_epoch(square, paper_epochs):
    """Complete paper augmentation, seeded crop and flip included: numba output = Python
    output (so the compiled crop boxes and coins are the documented draws)."""
    path, images, _ = square
    with python_mode():
        loader = pretrain_loader(path, PAPER_BATCH, 2, paper_views_28(), MEAN, STD, seed=PAPER_SEED)
        reference = [collect(loader), collect(loader)]

    for batches, want_batches in zip(paper_epochs, reference):
        assert len(batches) == 4
        for a, b in batches:
            assert a.shape == b.shape == (PAPER_BATCH, 3, 28, 28) and a.dtype == b.dtype == torch.float32
            assert a.is_contiguous(memory_format=torch.channels_last)
        for k in (0, 1):
            got = to_uint8(torch.cat([pair[k] for pair in batches]))
            np.testing.assert_allclose(got, np.round(got), atol=1e-3)  # normalised integers
            want = to_uint8(torch.cat([pair[k] for pair in want_batches]))
            diff = np.abs(got - want)
            # fastmath may move a rounding by one level, rarely; a different crop box or
            # coin would change whole images.
            assert diff.max() <= 2 and (diff > 0.5).mean() < 0.01
        a, b = (torch.cat([pair[k] for pair in batches]) for k in (0, 1))
        assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 0.1  # the two views differ

    # The same image is augmented differently in the next epoch (new batches, new draws).
    firsts = []
    for epoch, batches in enumerate(paper_epochs):
        order = np.random.default_rng(PAPER_SEED + epoch).permutation(64)  # ffcv's RANDOM order
        view_a_epoch = torch.cat([pair[0] for pair in batches])
        firsts.append(view_a_epoch[np.argsort(order)])
    change = (firsts[0] - firsts[1]).abs().amax(dim=(1, 2, 3))
    assert change.min() > 0 and change.median() > 0.5


def assert_same_batches(got, want):
    assert len(got) == len(want)
    for pair, want_pair in zip(got, want):
        for x, y in zip(pair, want_pair):
            assert torch.equal(x, y)


@pytest.mark.slow
def test_same_seed_is_bit_identical_and_resumes_at_any_epoch_and_step(square, paper_epochs):
    """A second loader with the same seed (as a resumed run builds it) reproduces every
    batch exactly, whichever epoch or step it starts at; another seed differs."""
    path = square[0]
    views = paper_views_28()
    loader = pretrain_loader(path, PAPER_BATCH, 2, views, MEAN, STD, seed=PAPER_SEED,
                             batches_ahead=1)
    loader.seek(1)  # resume at the start of epoch 1, without producing epoch 0
    assert_same_batches(collect(loader), paper_epochs[1])
    loader.seek(0)
    assert_same_batches(collect(loader), paper_epochs[0])
    assert_same_batches(collect(loader), paper_epochs[1])  # and it carries on to epoch 1
    loader.seek(1, 3)  # mid-epoch: batches 3, … of epoch 1
    assert_same_batches(collect(loader), paper_epochs[1][3:])
    assert loader.next_epoch == 2
    with pytest.raises(ValueError):
        loader.seek(0, len(loader) + 1)

    # Another seed: other operation seeds and other draws for every image.
    for op, other in zip(view_operations(views[1], PAPER_SEED, 1), view_operations(views[1], 4, 1)):
        assert op.seed != other.seed
    subset = np.arange(16)
    with python_mode():
        runs = [collect(pretrain_loader(path, 16, 1, views, MEAN, STD, seed=seed,
                                        order="sequential", indices=subset))[0]
                for seed in (PAPER_SEED, 4)]
    for k in (0, 1):
        assert (runs[0][k] - runs[1][k]).abs().amax(dim=(1, 2, 3)).min() > 0.1


def test_python_crop_and_flip_are_the_drawn_boxes(wide):
    """The crop decoder cuts crop_box(uniforms) and area-resizes it; the flip mirrors it."""
    path, images, _ = wide
    view = ViewSpec(resolution=32, flip_p=0.5, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    crop, flip = view_operations(view, 7, 1)
    with python_mode():
        loader = pretrain_loader(path, 8, 1, (view, view), MEAN, STD, seed=7, order="sequential")
        got = to_uint8(torch.cat([b for _, b in collect(loader)]))
    boxes, flipped = [], []
    for start in range(0, 40, 8):
        idx = np.arange(start, start + 8, dtype=np.uint64)
        u = uniforms(idx, crop.seed, CROP_UNIFORMS)
        boxes += [crop_box(40, 48, 0.08, 1.0, 3 / 4, 4 / 3, row) for row in u]
        flipped += list(uniforms(idx, flip.seed, 1)[:, 0] < 0.5)
    for image, result, (i, j, h, w), mirror in zip(images, got, boxes, flipped):
        want = cv2.resize(np.ascontiguousarray(image[i:i + h, j:j + w]), (32, 32),
                          interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(result, want[:, ::-1] if mirror else want, atol=1 + 1e-3)
    assert len(set(boxes)) > 30 and 5 < sum(flipped) < 35


def test_round_trip_with_augmentations_off(square, wide):
    """A whole-image crop and no other augmentation returns the stored images."""
    path, images, _ = square
    off = ViewSpec(**IDENTITY_CROP, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0)
    with python_mode():
        loader = pretrain_loader(path, 16, 1, (off, off), MEAN, STD, seed=0, order="sequential",
                                 channels_last=False)
        batches = collect(loader)
    a = torch.cat([x for x, _ in batches])
    b = torch.cat([y for _, y in batches])
    assert a.is_contiguous() and torch.equal(a, b)
    np.testing.assert_allclose(to_uint8(a), images, atol=1e-3)
    expected = (images / 255.0 - np.asarray(MEAN)) / np.asarray(STD)
    np.testing.assert_allclose(a.permute(0, 2, 3, 1).numpy(), expected, atol=1e-5)

    # 40×48: a square crop cannot have the whole area, so ffcv falls back to the centre square.
    path, images, _ = wide
    off40 = replace(off, resolution=40)
    with python_mode():
        loader = pretrain_loader(path, 8, 1, (off40, off40), MEAN, STD, seed=0, order="sequential")
        a = torch.cat([x for x, _ in collect(loader)])
    np.testing.assert_allclose(to_uint8(a), images[:, :, 4:44], atol=1e-3)


def test_pretrain_loader_as_python_honours_indices_and_ops(square):
    """With the compiler off the custom ops run too, and equal the reference exactly."""
    path, images, _ = square
    view_a, view_b = (replace(v, **IDENTITY_CROP) for v in paper_views(28))
    subset = np.array([1, 5, 8, 13, 21, 34, 55, 60])
    with python_mode():
        loader = pretrain_loader(path, 4, 1, (view_a, view_b), MEAN, STD, seed=5,
                                 order="sequential", indices=subset)
        batches = collect(loader)
    assert len(batches) == 2
    for k, view in enumerate((view_a, view_b)):
        got = to_uint8(torch.cat([pair[k] for pair in batches]))
        want = reference_views(images, subset.astype(np.uint64), 4, view, 5, k)
        np.testing.assert_allclose(got, want, atol=1e-3)


def test_eval_loader_returns_stored_images_and_labels_in_order(square):
    path, images, labels = square
    loader = eval_loader(path, 24, 2, 28, MEAN, STD, train_aug=False, crop_ratio=1.0)
    batches = collect(loader)
    assert [len(y) for _, y in batches] == [24, 24, 16]  # drop_last=False by default
    x = torch.cat([x for x, _ in batches])
    y = torch.cat([y for _, y in batches])
    assert y.dtype == torch.int64 and y.shape == (64,)
    np.testing.assert_array_equal(y.numpy(), labels)
    assert x.dtype == torch.float32 and x.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(to_uint8(x), images, atol=1e-3)


def test_eval_loader_subset_centre_crop_and_train_augmentation(wide):
    path, images, labels = wide
    subset = [2, 3, 17, 30, 39]
    with python_mode():
        loader = eval_loader(path, 2, 1, 32, MEAN, STD, train_aug=False, indices=subset)
        x, y = (torch.cat(t) for t in zip(*collect(loader)))
        augmented = [collect(eval_loader(path, 8, 1, 32, MEAN, STD, train_aug=True,
                                         order="random", seed=seed)) for seed in (1, 1, 2)]
    xa, ya = (torch.cat(t) for t in zip(*augmented[0]))
    assert_same_batches(augmented[1], augmented[0])  # seeded crop and flip
    xb = torch.cat([x for x, _ in augmented[2]])
    assert not torch.equal(xa, xb)
    np.testing.assert_array_equal(y.numpy(), labels[subset])
    # Resize(256)+CenterCrop(224) equivalent: the central 35-pixel square (⌊0.875·40⌋),
    # area-resampled to 32 px.
    for got, image in zip(to_uint8(x), images[subset]):
        crop = np.ascontiguousarray(image[2:37, 6:41])
        want = cv2.resize(crop, (32, 32), interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(got, want, atol=1 + 1e-3)
    assert xa.shape == (40, 3, 32, 32) and sorted(ya.tolist()) == sorted(labels.tolist())


def test_bad_order_is_rejected(square):
    with pytest.raises(ValueError, match="order"):
        eval_loader(square[0], 8, 1, 28, MEAN, STD, train_aug=False, order="shuffled")


HOST_VIEWS = Path(__file__).parent / "data" / "host_views_05becbe.npz"


def test_host_colour_ops_give_the_views_of_the_code_before_colour_ops_on(tiny_ffcv):
    """colour_ops_on="host" (params.yaml's, which made the committed metrics) draws and
    computes what the loader did before the colour ops could run on the device:
    tests/data/host_views_05becbe.npz holds the paper's two views at 16 px of the first 16
    images of tiny_ffcv's test split (seed 11, random order, batches of 8, 2 epochs,
    plain-Python pipelines, uint8 NCHW), made with main at 05becbe. Bit-identical on the
    machine that made it; elsewhere numpy's exp may round the blur taps otherwise, so ±1
    in at most 1e-3 of the values is allowed (a changed draw moves far more)."""
    with python_mode():
        loader = pretrain_loader(str(tiny_ffcv / "test.beton"), 8, 1, paper_views(16),
                                 (0.0, 0.0, 0.0), (1 / 255,) * 3, seed=11, order="random",
                                 indices=list(range(16)), channels_last=False,
                                 colour_ops_on="host")
        got = np.concatenate([np.stack([a.numpy(), b.numpy()], 1)
                              for _ in range(2) for a, b in loader])
    want = np.load(HOST_VIEWS)["views"]
    assert got.shape == want.shape == (32, 2, 3, 16, 16)
    assert np.array_equal(got, np.round(got))
    diff = np.abs(got.astype(np.int16) - want)
    assert diff.max() <= 1 and (diff > 0).mean() <= 1e-3


@pytest.mark.parametrize("batch_size", [1, 16, 63, 64, 65, 128])
@pytest.mark.parametrize("drop_last", [True, False])
def test_batches_per_epoch_is_the_loaders_len(tiny_ffcv, batch_size, drop_last):
    """The arithmetic the stages check before any loader exists (one process: a world
    size of n deals ⌈64/n⌉ rows to each, torch's DistributedSampler's padding)."""
    loader = eval_loader(str(tiny_ffcv / "train.beton"), batch_size, 1, 16, MEAN, STD,
                         train_aug=False, drop_last=drop_last)
    assert len(loader) == batches_per_epoch(64, batch_size, 1, drop_last)


def test_batches_per_epoch_over_processes():
    assert batches_per_epoch(64, 32, 2, True) == 1  # 32 rows per process
    assert batches_per_epoch(63, 32, 2, True) == 1  # 32 rows per process, one padded
    assert batches_per_epoch(62, 32, 2, True) == 0
    assert batches_per_epoch(62, 32, 2, False) == 1


def test_progressive_resolution_is_the_ramp_formula():
    """r(e) = step·⌊(min + f·(R − min))/step + ½⌋ with
    f = clip((e/E − ramp0)/(ramp1 − ramp0), 0, 1), and R itself from e/E ≥ ramp1 on."""
    sides = [progressive_resolution(e, 10, 28, 16, (0.1, 0.8), 4) for e in range(10)]
    # f = 0, 0, 1/7, 2/7, …: 16 + 12f = 16, 16, 17.7, 19.4, 21.1, 22.9, 24.6, 26.3, then R.
    assert sides == [16, 16, 16, 20, 20, 24, 24, 28, 28, 28]
    # FFCV's ImageNet ramp (160 → 192 px over epochs 2…13 of 16, multiples of 32; its
    # interpolation is on the epoch index itself, here e/E).
    assert [progressive_resolution(e, 16, 192, 160, (2 / 16, 13 / 16), 32)
            for e in (0, 2, 7, 8, 12, 13, 15)] == [160, 160, 160, 192, 192, 192, 192]
    # A step that does not divide the sides: rounded, then clipped to [min, R].
    assert [progressive_resolution(e, 4, 30, 17, (0.0, 1.0), 8)
            for e in range(4)] == [17, 24, 24, 24]
    assert progressive_resolution(3, 4, 30, 17, (0.0, 1.0), 64) == 17  # 26.75 → 0
    assert progressive_resolution(3, 4, 30, 17, (0.0, 1.0), 40) == 30  # 26.75 → 40
    # A ramp of zero width is a jump; a ramp ending at 1 never reaches R.
    assert [progressive_resolution(e, 4, 28, 12, (0.5, 0.5), 4)
            for e in range(4)] == [12, 12, 28, 28]
    assert progressive_resolution(3, 4, 28, 13, (0.0, 1.0), 1) == 24  # 13 + 0.75·15 = 24.25


def test_progressive_resizing_resizes_the_same_crops_each_epoch(square):
    """With ``resolution_at`` epoch e is the batch a loader fixed at resolution_at(e)
    yields for epoch e (the same boxes, flips and colours, resized otherwise), from the
    start or after a seek, and every later epoch follows the schedule."""
    path = square[0]
    schedule = {0: 12, 1: 28, 2: 20}.__getitem__
    views = paper_views_28()

    def loader(side=None, **kwargs):
        fixed = views if side is None else tuple(replace(v, resolution=side) for v in views)
        return pretrain_loader(path, 8, 1, fixed, MEAN, STD, seed=PAPER_SEED,
                               indices=np.arange(16), **kwargs)

    with python_mode():
        ramped = loader(resolution_at=schedule)
        epochs = [collect(ramped) for _ in range(3)]
        for epoch, got in enumerate(epochs):
            fixed = loader(schedule(epoch))
            fixed.seek(epoch)
            assert_same_batches(got, collect(fixed))
            assert got[0][0].shape == (8, 3, schedule(epoch), schedule(epoch))
        resumed = loader(resolution_at=schedule)
        resumed.seek(2, 1)
        assert_same_batches(collect(resumed), epochs[2][1:])
