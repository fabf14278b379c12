"""Subset files on an ImageNet-shaped dataset: SimCLR's vendored lists pass the checks on
all 1000 synsets with unequal class sizes; the ImageFolder validation split is
reproducible, uniform and disjoint from the lists; a tampered list (a class removed, a
name not in the dataset, an overlap with val) is refused naming the file and line; the
official full checkpoint.pth loads as --weights."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch

from barlow.checkpoint import CheckpointError, load_backbone_weights
from barlow.data.sources import DataError
from barlow.data.subsets import (VAL_KEY, VAL_PER_CLASS, check_class_counts, check_splits,
                                 hashed_val_split, write_subset)
from barlow.models import BarlowTwins, Projector, build_backbone
from imagenet_tree import LISTS, SIZE_RATIO, all_synsets, make_names, synset

SUBSETS = ("1percent", "10percent")


@pytest.fixture(scope="module")
def imagenet() -> dict:
    """The file list and labels of an ImageNet-shaped train split: 1000 synsets, every
    name of SimCLR's lists, class sizes from 140 to 249 (ratio 732/1300)."""
    wnids = all_synsets()
    per_class = make_names(wnids, spare=VAL_PER_CLASS + 1)
    files = [f"{w}/{n}" for w in wnids for n in per_class[w]]
    labels = np.repeat(np.arange(len(wnids)), [len(per_class[w]) for w in wnids])
    return {"files": files, "labels": labels, "classes": wnids}


def splits(imagenet, subsets_dir, names=SUBSETS):
    return check_splits(subsets_dir, imagenet["files"], imagenet["labels"],
                        imagenet["classes"], names)


def test_tree_is_imagenet_shaped(imagenet):
    sizes = np.bincount(imagenet["labels"])
    assert len(sizes) == 1000
    assert sizes.min() / sizes.max() == pytest.approx(SIZE_RATIO, abs=0.01)


def test_vendored_lists_pass_and_val_follows_the_rule(imagenet):
    val, subsets, origin = splits(imagenet, LISTS)
    labels, files = imagenet["labels"], imagenet["files"]
    counts = {k: np.bincount(labels[v], minlength=1000) for k, v in subsets.items()}
    assert (counts["1percent"].min(), counts["1percent"].max()) == (12, 13)
    assert (counts["10percent"].min(), counts["10percent"].max()) == (128, 129)
    assert np.bincount(labels[val], minlength=1000).tolist() == [VAL_PER_CLASS] * 1000
    for indices in subsets.values():
        assert not np.isin(indices, val).any()
    assert "sha256" in origin
    # The rule, recomputed from its statement: per class, the smallest keyed hashes
    # among the names outside both lists.
    listed = {files[i].split("/")[1] for v in subsets.values() for i in v}
    wnid = imagenet["classes"][7]
    outside = [f.split("/")[1] for f in files if f.startswith(wnid) and f.split("/")[1] not in listed]
    expected = sorted(outside, key=lambda n: hashlib.sha256(f"{VAL_KEY}/{n}".encode()).hexdigest())
    chosen = [files[i].split("/")[1] for i in val if labels[i] == 7]
    assert sorted(chosen) == sorted(expected[:VAL_PER_CLASS])


def test_written_val_file_is_the_rule(imagenet, tmp_path):
    """A val.txt written from the rule (as `python -m barlow.data.subsets --dataset
    imagefolder` writes it) and read back gives the same split."""
    val, _, _ = splits(imagenet, LISTS, ())
    for name in SUBSETS:
        (tmp_path / f"{name}.txt").write_text((LISTS / f"{name}.txt").read_text())
    write_subset(tmp_path / "val.txt", [imagenet["files"][i].split("/")[1] for i in val], "val")
    again, _, origin = splits(imagenet, tmp_path)
    np.testing.assert_array_equal(again, val)
    assert origin == str(tmp_path / "val.txt")


def copy_lists(tmp_path, edit=None) -> None:
    """The vendored lists into tmp_path, 1percent.txt's lines passed through ``edit``."""
    for name in SUBSETS:
        lines = (LISTS / f"{name}.txt").read_text().splitlines()
        if name == "1percent" and edit:
            lines = edit(lines)
        (tmp_path / f"{name}.txt").write_text("".join(x + "\n" for x in lines))


def test_a_class_removed_is_refused(imagenet, tmp_path):
    gone = synset((LISTS / "1percent.txt").read_text().split()[0])
    copy_lists(tmp_path, lambda lines: [x for x in lines if synset(x) != gone])
    with pytest.raises(DataError, match=rf"{tmp_path / '1percent.txt'}: no image of 1 class.*'{gone}'"):
        splits(imagenet, tmp_path)


def test_a_name_not_in_the_dataset_is_refused(imagenet, tmp_path):
    copy_lists(tmp_path, lambda lines: lines[:99] + ["n01440764_999999999.JPEG"] + lines[99:])
    with pytest.raises(DataError, match=rf"1percent.txt:100: 'n01440764_999999999.JPEG' is not in"):
        splits(imagenet, tmp_path)


def test_a_name_twice_is_refused(imagenet, tmp_path):
    """The same image listed again, by its bare name or with its class folder."""
    copy_lists(tmp_path, lambda lines: lines[:5] + [f"{synset(lines[2])}/{lines[2]}"] + lines[5:])
    first = (LISTS / "1percent.txt").read_text().split()[2]
    with pytest.raises(DataError, match=rf"1percent.txt:6: '{synset(first)}/{first}' repeats"
                                        " line 3$"):
        splits(imagenet, tmp_path)


@pytest.mark.parametrize("line, message", [
    ("", "blank line; one entry per line, comments after #"),
    ("   ", "blank line; one entry per line, comments after #"),
    ("n01440764_10026.JPEG n01440764_10027.JPEG", "is more than one entry; one per line"),
    # A name of ImageNet's val/ folder, which is the test split here.
    ("ILSVRC2012_val_00000001.JPEG", "is not in the converted dataset's training split"),
])
def test_a_line_that_is_not_one_entry_is_refused(imagenet, tmp_path, line, message):
    copy_lists(tmp_path, lambda lines: lines[:41] + [line] + lines[41:])
    with pytest.raises(DataError, match=rf"1percent.txt:42: .*{message}"):
        splits(imagenet, tmp_path)


def test_an_overlap_with_val_is_refused(imagenet, tmp_path):
    copy_lists(tmp_path)
    val, _, _ = splits(imagenet, tmp_path, ())
    taken = imagenet["files"][val[0]].split("/")[1]
    # A val.txt that takes one of 1percent.txt's names (and one of its own less).
    first = (LISTS / "1percent.txt").read_text().split()
    leaked = next(n for n in first if synset(n) == synset(taken))
    names = [imagenet["files"][i].split("/")[1] for i in val if i != val[0]] + [leaked]
    write_subset(tmp_path / "val.txt", names, "val")
    with pytest.raises(DataError, match=rf"1percent.txt:{first.index(leaked) + 1}: '{leaked}'"
                                        " is also in the validation split"):
        splits(imagenet, tmp_path)


@pytest.mark.parametrize("counts, sizes, ok", [
    ([12, 13, 13, 12], [732, 1300, 1000, 900], True),     # uniform within 1 (SimCLR 1%)
    ([7, 13, 10, 9], [732, 1300, 1000, 900], True),       # proportional within rounding
    ([60] * 10, [6000] * 10, True),                       # Fashion-MNIST
    ([12, 14, 13, 12], [732, 1300, 1000, 900], False),    # neither: 12..14 and 14 ≠ 13.6±1
    ([12, 0, 13, 12], [732, 1300, 1000, 900], False),     # a class missing
])
def test_class_count_rule(counts, sizes, ok):
    check = lambda: check_class_counts("f.txt", np.array(counts), np.array(sizes), list("abcd") * 3)
    if ok:
        check()
    else:
        with pytest.raises(DataError, match="f.txt: "):
            check()


def test_val_rule_needs_enough_images_per_class():
    names = [f"n0_{i}.JPEG" for i in range(12)]
    labels = np.array([0] * 6 + [1] * 6)
    with pytest.raises(DataError, match="class 1: 5 images outside the training subsets"):
        hashed_val_split(names, labels, {6}, per_class=6)


def test_a_converted_tree_reads_names_and_the_cli_writes_the_rule(tmp_path):
    """On a converted ImageNet-shaped tree (2 synsets, JPEGs): the one reading path of
    linear and semisup maps the cut lists' names to indices and applies the rule; the
    CLI writes that split as val.txt of names, which then reads back the same."""
    from click.testing import CliRunner

    from barlow.data import subsets as cli
    from barlow.data.convert import FfcvSettings, read_manifest, write_beton
    from barlow.data.sources import image_folder
    from barlow.data.subsets import load_splits
    from imagenet_tree import make_tree, sample_synsets

    lists = tmp_path / "lists"
    make_tree(tmp_path / "tree", sample_synsets(2), VAL_PER_CLASS + 1, 2, subsets_out=lists)
    beton = tmp_path / "ffcv" / "train.beton"
    write_beton(image_folder(tmp_path / "tree" / "train", "train", None, False, 1), beton,
                FfcvSettings("raw"), 1)
    manifest = read_manifest(beton)
    val, subsets, origin = load_splits(lists, beton, manifest, SUBSETS)
    labels = np.repeat([0, 1], manifest["class_counts"])
    assert np.bincount(labels[val]).tolist() == [VAL_PER_CLASS] * 2 and "sha256" in origin
    assert [len(subsets[k]) for k in SUBSETS] == [
        len((lists / f"{k}.txt").read_text().split()) for k in SUBSETS]
    result = CliRunner().invoke(cli.main, ["--dataset", "imagefolder", "--data",
                                           str(beton.parent), "--out", str(lists)])
    assert result.exit_code == 0, result.output
    assert (lists / "val.txt").read_text().splitlines()[1].endswith(".JPEG")
    again, _, origin = load_splits(lists, beton, manifest, SUBSETS)
    np.testing.assert_array_equal(again, val)
    assert origin == str(lists / "val.txt")


# ------------------------------------------------- the official full checkpoint.pth

def official_checkpoint(path, backbone, ddp: bool = True) -> None:
    """What facebookresearch/barlowtwins main.py saves each epoch:
    dict(epoch, model=BarlowTwins (under DDP) state dict, optimizer=LARS state dict)."""
    model = BarlowTwins(backbone, Projector(64, "32-32"))
    state = {("module." if ddp else "") + k: v for k, v in model.state_dict().items()}
    state[("module." if ddp else "") + "bn.running_mean"] = torch.zeros(32)
    torch.save({"epoch": 3, "model": state, "optimizer": {
        "state": {0: {"mu": torch.zeros(3)}},
        "param_groups": [{"lr": 0.0, "weight_decay": 1.5e-6, "momentum": 0.9, "eta": 0.001,
                          "weight_decay_filter": True, "lars_adaptation_filter": True,
                          "params": [0]}]}}, path)


@pytest.mark.parametrize("ddp", [True, False])
def test_official_full_checkpoint_loads_its_backbone(tmp_path, ddp):
    torch.manual_seed(0)
    trained, _ = build_backbone("small_resnet", 4, (1, 1, 1, 1))
    official_checkpoint(tmp_path / "checkpoint.pth", trained, ddp)
    fresh, _ = build_backbone("small_resnet", 4, (1, 1, 1, 1))
    load_backbone_weights(fresh, tmp_path / "checkpoint.pth")
    for k, v in trained.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k


def test_a_checkpoint_that_does_not_fit_is_refused_in_one_line(tmp_path):
    wide, _ = build_backbone("small_resnet", 8, (1, 1, 1, 1))
    official_checkpoint(tmp_path / "checkpoint.pth", wide)
    narrow, _ = build_backbone("small_resnet", 4, (1, 1, 1, 1))
    with pytest.raises(CheckpointError, match="does not fit the backbone") as err:
        load_backbone_weights(narrow, tmp_path / "checkpoint.pth")
    assert "\n" not in str(err.value)
    torch.save({"epoch": 1, "model": {"projector.0.weight": torch.zeros(2, 2)}},
               tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="no 'backbone.\\*' weights; give --weights"):
        load_backbone_weights(narrow, tmp_path / "other.pth")


def test_non_finite_weights_are_refused(tmp_path):
    """What the pretrain stage exported once (bf16 on CPU, a strided conv on 1x1 maps:
    Inf gradients, NaN after LARS): refused by name, not evaluated."""
    backbone, _ = build_backbone("small_resnet", 4, (1, 1, 1, 1))
    state = backbone.state_dict()
    state["layer4.0.conv2.weight"][0, 0, 1, 0] = float("nan")
    torch.save(state, tmp_path / "backbone.pt")
    with pytest.raises(CheckpointError, match=r"non-finite weights .* first layer4\.0\.conv2\.weight"):
        load_backbone_weights(backbone, tmp_path / "backbone.pt")
