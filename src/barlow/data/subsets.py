"""Label subsets of a training set: the held-out validation split and the 1% / 10%
semi-supervised subsets, read and checked in one place for every stage that uses them.

The files are data, versioned in git under ``data/subsets/<dataset>/`` and never written
by the pipeline. A subset file holds one entry per line, ``#`` comments allowed; an entry
is either a sample index into the ``.beton`` or an image file name (SimCLR's ImageNet
lists ``1percent.txt`` / ``10percent.txt`` hold names such as ``n04235860_14959.JPEG``),
matched by base name against the file list the convert stage writes beside an
ImageFolder dataset.

Fashion-MNIST (``data/subsets/fashion_mnist``, 60,000 training images, 10 classes; a
test checks that the committed files are what ``python -m barlow.data.subsets`` gives):
- ``val.txt``: 500 images per class (5,000) held out of every labelled fit, used for
  choosing epochs and settings; the test split gives only the final figures.
- ``1percent.txt``: 60 per class (600 = 1%), ``10percent.txt``: 600 per class (6,000 =
  10%), both drawn from the training images outside ``val.txt``; 1% ⊂ 10%.

ImageFolder datasets (ImageNet: ``data/subsets/imagenet`` holds SimCLR's two lists and
no ``val.txt``): the validation split is a rule over file names, so it needs no shipped
file list. Per class, among the training images whose name is in no training subset of
the folder (every ``*.txt`` but ``val.txt``), the ``VAL_PER_CLASS`` with the smallest
``sha256(VAL_KEY + "/" + name)``; for ImageNet 10,000 images (10 of every class's 732 to
1,300). ``python -m barlow.data.subsets --dataset imagefolder`` writes the same split out
as a ``val.txt`` to read or commit; a ``val.txt`` present in the folder is used instead.

Checks (``check_class_counts``), so that a file that is not what it claims is refused:
every class is present, and the per-class counts k_c are either uniform (max k − min k
≤ 1: SimCLR's 12-13 and 128-129 per class, Fashion-MNIST's equal counts) or
proportional to the class sizes n_c within rounding (|k_c − f·n_c| < 1 with f = Σk/Σn);
every entry exists in the dataset, none repeats, and no training subset shares an image
with the validation split.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np

from barlow.data.sources import DataError

VAL_PER_CLASS_FRACTION = 1 / 12
SUBSET_FRACTIONS = {"1percent": 0.01, "10percent": 0.10}
VAL_NAME = "val"
# The ImageFolder validation rule: changing either value changes every split made with it.
VAL_PER_CLASS = 10
VAL_KEY = "barlow-val-0"


def balanced_subsets(labels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Class-balanced, nested, deterministic subsets of ``labels``' indices.

    Per class c with n_c members, in one seeded permutation: the first
    round(n_c/12) go to "val"; of the rest, the first round(f·n_c) form subset f (so
    smaller subsets are prefixes of larger ones). Returns sorted index arrays."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"val": [], **{k: [] for k in SUBSET_FRACTIONS}}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        n_val = round(len(members) * VAL_PER_CLASS_FRACTION)
        out["val"].extend(members[:n_val])
        rest = members[n_val:]
        for name, fraction in SUBSET_FRACTIONS.items():
            out[name].extend(rest[:round(len(members) * fraction)])
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def proportional_subsets(labels: np.ndarray, seed: int,
                         fractions: Mapping[str, float] = SUBSET_FRACTIONS
                         ) -> dict[str, np.ndarray]:
    """Nested, deterministic training subsets of a dataset with unequal classes: per
    class c with n_c members, in one seeded permutation, the first max(1, ⌊f·n_c + ½⌋)
    form subset f (a class never goes missing; smaller subsets are prefixes of larger
    ones). Proportional to the class sizes within rounding, as check_class_counts
    accepts (or uniform, where every class gets 1). Sorted index arrays."""
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {k: [] for k in fractions}
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        for name, fraction in fractions.items():
            out[name].extend(members[:max(1, int(np.floor(fraction * len(members) + 0.5)))])
    return {k: np.sort(np.asarray(v, dtype=np.int64)) for k, v in out.items()}


def hashed_val_split(names: Sequence[str], labels: np.ndarray, excluded: set[int],
                     per_class: int = VAL_PER_CLASS, key: str = VAL_KEY) -> np.ndarray:
    """The ImageFolder validation rule (module docstring): per class, the ``per_class``
    images (base ``names``, in dataset order) whose index is not in ``excluded`` with
    the smallest sha256(key/name). Sorted indices; a class with too few candidates
    raises DataError."""
    rank = {i: hashlib.sha256(f"{key}/{name}".encode()).hexdigest()
            for i, name in enumerate(names) if i not in excluded}
    out: list[int] = []
    for c in np.unique(labels):
        candidates = sorted((i for i in np.flatnonzero(labels == c).tolist() if i in rank),
                            key=rank.__getitem__)
        if len(candidates) < per_class:
            raise DataError(f"class {int(c)}: {len(candidates)} images outside the training"
                            f" subsets, fewer than the {per_class} the validation split takes")
        out.extend(candidates[:per_class])
    return np.sort(np.asarray(out, dtype=np.int64))


def check_class_counts(where: str | Path, counts: np.ndarray, sizes: np.ndarray,
                       class_names: Sequence[str]) -> None:
    """The rule of the module docstring: counts k_c of every class present, and either
    uniform (max k − min k ≤ 1) or proportional to the class sizes n_c within rounding
    (|k_c − f·n_c| < 1, f = Σk/Σn). Otherwise DataError naming ``where`` (the file) and
    the classes."""
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        shown = ", ".join(f"{class_names[c]!r} (class {c})" for c in missing[:5])
        raise DataError(f"{where}: no image of {missing.size} class(es): {shown}"
                        f"{' ...' if missing.size > 5 else ''}; a subset holds every class")
    if counts.max() - counts.min() <= 1:
        return
    expected = counts.sum() / sizes.sum() * sizes
    off = np.flatnonzero(np.abs(counts - expected) >= 1)
    if off.size:
        shown = ", ".join(f"{class_names[c]!r}: {counts[c]} (proportional:"
                          f" {expected[c]:.1f})" for c in off[:5])
        raise DataError(f"{where}: class counts are neither uniform (they run from"
                        f" {counts.min()} to {counts.max()}) nor proportional to the class"
                        f" sizes within rounding: {shown}")


@dataclass(frozen=True)
class SubsetFile:
    """A subset file's entries in file order: dataset indices, with their lines."""

    path: Path
    indices: np.ndarray       # (K,) int64, file order
    lines: list[tuple[int, str]]  # (line number, entry) per index

    def sorted(self) -> np.ndarray:
        return np.sort(self.indices)


def name_index(files: Sequence[str]) -> dict[str, int]:
    """Base name -> dataset index, for subset files that list image names (which need
    unique base names, as ImageNet's are)."""
    index = {os.path.basename(f): i for i, f in enumerate(files)}
    if len(index) != len(files):
        raise DataError(f"the dataset's file list has {len(files)} entries but only"
                        f" {len(index)} distinct base names; name lists need unique names")
    return index


def read_entries(path: str | Path, num_images: int,
                 names: Mapping[str, int] | None = None) -> SubsetFile:
    """The entries of ``path`` (indices, or file names looked up in ``names``, see
    name_index); every problem raises DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: subset file not found")
    indices, lines, seen = [], [], {}
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if entry.isdigit():
            index = int(entry)
        else:
            if names is None:
                raise DataError(f"{path}:{lineno}: {entry!r} is a file name, but this dataset"
                                " has no file list (only ImageFolder conversions do)")
            index = names.get(os.path.basename(entry))
            if index is None:
                raise DataError(f"{path}:{lineno}: {entry!r} is not in the converted dataset")
        if index >= num_images:
            raise DataError(f"{path}:{lineno}: index {index} out of range (dataset has"
                            f" {num_images} images)")
        if index in seen:
            raise DataError(f"{path}:{lineno}: {entry!r} repeats line {seen[index]}")
        seen[index] = lineno
        indices.append(index)
        lines.append((lineno, entry))
    if not indices:
        raise DataError(f"{path}: empty subset file")
    return SubsetFile(path, np.asarray(indices, dtype=np.int64), lines)


def read_subset(path: str | Path, num_images: int, files: list[str] | None = None) -> np.ndarray:
    """Sorted indices listed in ``path`` (read_entries; ``files``: the dataset's list)."""
    return read_entries(path, num_images, None if files is None else name_index(files)).sorted()


def beton_labels(beton: Path) -> np.ndarray:
    """All labels of a .beton in index order, read from its metadata table: no decoding
    and no JIT compilation (an IntField's value is stored in the metadata itself)."""
    from ffcv.reader import Reader

    reader = Reader(str(beton))
    if "label" not in reader.field_names:
        raise DataError(f"{beton}: no 'label' field (fields: {reader.field_names})")
    return np.asarray(reader.metadata[f"f{reader.field_names.index('label')}"], dtype=np.int64)


def manifest_files(beton: Path, manifest: dict) -> list[str] | None:
    """The ImageFolder file list the convert stage writes beside the .beton (it maps
    name lists such as SimCLR's to indices); None for array sources (Fashion-MNIST)."""
    if not manifest.get("files"):
        return None
    path = Path(beton).parent / manifest["files"]
    if not path.is_file():
        raise DataError(f"{path}: file list named by {Path(beton).with_suffix('.json')} is missing")
    return path.read_text().splitlines()


def training_subset_paths(subsets_dir: Path, val_name: str = VAL_NAME) -> list[Path]:
    """Every training subset of a folder: its ``*.txt`` files but the validation split."""
    return sorted(p for p in subsets_dir.glob("*.txt") if p.stem != val_name)


def rule_split(subsets_dir: Path, names: Mapping[str, int], labels: np.ndarray,
               val_name: str = VAL_NAME) -> np.ndarray:
    """The ImageFolder validation split: hashed_val_split outside every training subset
    of ``subsets_dir`` (``names``: name_index of the dataset's files)."""
    if not subsets_dir.is_dir():
        raise DataError(f"{subsets_dir}: subsets folder not found (data.subsets_dir)")
    excluded = {int(i) for p in training_subset_paths(subsets_dir, val_name)
                for i in read_entries(p, len(labels), names).indices}
    try:
        return hashed_val_split(list(names), labels, excluded)
    except DataError as err:
        raise DataError(f"{subsets_dir}: validation split: {err}") from None


def validation_split(subsets_dir: Path, names: Mapping[str, int] | None, labels: np.ndarray,
                     val_name: str = VAL_NAME) -> tuple[np.ndarray, str]:
    """(sorted indices, where they came from): ``<subsets_dir>/<val_name>.txt`` when it
    exists or the dataset has no file list (``names`` None), else the ImageFolder rule
    (rule_split)."""
    path = subsets_dir / f"{val_name}.txt"
    if path.is_file() or names is None:
        return read_entries(path, len(labels), names).sorted(), str(path)
    return (rule_split(subsets_dir, names, labels, val_name),
            f"{VAL_PER_CLASS} per class by sha256({VAL_KEY!r}/name), outside {subsets_dir}/*.txt")


def check_splits(subsets_dir: Path, files: list[str] | None, labels: np.ndarray,
                 class_names: Sequence[str], subset_names: Sequence[str] = (),
                 val_name: str = VAL_NAME) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """The validation split (validation_split) and each named training subset
    (``<subsets_dir>/<name>.txt``) as sorted indices into a dataset of ``labels`` (and
    ``files``, for name lists), every one checked (module docstring); and where the
    validation split came from."""
    num = len(labels)
    names = None if files is None else name_index(files)
    sizes = np.bincount(labels, minlength=len(class_names))
    val, origin = validation_split(subsets_dir, names, labels, val_name)
    check_class_counts(origin, np.bincount(labels[val], minlength=len(sizes)), sizes,
                       class_names)
    subsets = {}
    for name in subset_names:
        subset = read_entries(subsets_dir / f"{name}.txt", num, names)
        in_val = np.flatnonzero(np.isin(subset.indices, val))
        if in_val.size:
            # Choosing the epoch on images the model trained on would flatter it.
            lineno, entry = subset.lines[in_val[0]]
            raise DataError(f"{subset.path}:{lineno}: {entry!r} is also in the validation"
                            f" split ({origin}; {in_val.size} entries in all): training"
                            " subsets must be disjoint from it")
        check_class_counts(subset.path, np.bincount(labels[subset.indices],
                                                    minlength=len(sizes)), sizes, class_names)
        subsets[name] = subset.sorted()
    return val, subsets, origin


def load_splits(subsets_dir: str | Path, beton: Path, manifest: dict,
                subset_names: Sequence[str] = (), val_name: str = VAL_NAME,
                ) -> tuple[np.ndarray, dict[str, np.ndarray], str]:
    """check_splits on a converted dataset (``beton`` and its manifest): the one
    reading path of the validation split and the training subsets for linear and
    semisup."""
    labels = beton_labels(beton)
    if len(labels) != manifest["num_images"]:
        raise DataError(f"{beton}: {len(labels)} labels, but its manifest says"
                        f" {manifest['num_images']} images")
    return check_splits(Path(subsets_dir), manifest_files(beton, manifest), labels,
                        manifest["class_names"], subset_names, val_name)


def write_subset(path: Path, indices: Sequence, header: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {header}\n" + "".join(f"{i}\n" for i in indices))


@click.command()
@click.option("--dataset", type=click.Choice(["fashion_mnist", "imagefolder"]),
              default="fashion_mnist", show_default=True)
@click.option("--source-dir", default="/usr/share/datasets/fashion-mnist", show_default=True,
              help="fashion_mnist: the IDX files")
@click.option("--data", "data_dir", default="data/ffcv", show_default=True,
              type=click.Path(path_type=Path), help="imagefolder: the converted dataset")
@click.option("--out", "out_dir", default="data/subsets/fashion_mnist", show_default=True,
              type=click.Path(path_type=Path),
              help="fashion_mnist: folder written; imagefolder: the subsets folder read"
                   " (its training subsets) and written (val.txt)")
@click.option("--seed", default=0, show_default=True,
              help="fashion_mnist; imagefolder with --make-subsets")
@click.option("--make-subsets", is_flag=True,
              help="imagefolder: first write 1percent.txt and 10percent.txt (file names,"
                   " proportional_subsets) into --out, replacing any there")
def main(dataset: str, source_dir: str, data_dir: Path, out_dir: Path, seed: int,
         make_subsets: bool) -> None:
    """Make subset files: Fashion-MNIST's three, or an ImageFolder dataset's val.txt by
    the hashed rule (module docstring), with --make-subsets after its own 1percent.txt
    and 10percent.txt. The pipeline only reads them."""
    if dataset == "fashion_mnist":
        from barlow.data.sources import fashion_mnist

        labels = fashion_mnist(source_dir, "train").labels
        for name, idx in balanced_subsets(labels, seed).items():
            write_subset(out_dir / f"{name}.txt", idx,
                         f"{dataset} train indices: {name}, class-balanced, seed {seed},"
                         " made by `python -m barlow.data.subsets`")
        return
    from barlow.data.convert import read_manifest

    beton = data_dir / "train.beton"
    try:
        manifest = read_manifest(beton)
        files = manifest_files(beton, manifest)
        if files is None:
            raise DataError(f"{beton}: not an ImageFolder conversion (no file list)")
        labels = beton_labels(beton)
        if make_subsets:
            for name, idx in proportional_subsets(labels, seed).items():
                write_subset(out_dir / f"{name}.txt", [Path(files[i]).name for i in idx],
                             f"{name} of {manifest['source']}: max(1, round(f·n)) per class"
                             f" (f = {SUBSET_FRACTIONS[name]}), seed {seed}; made by"
                             " `python -m barlow.data.subsets --dataset imagefolder"
                             " --make-subsets`")
                click.echo(f"{out_dir / name}.txt: {len(idx)} images")
        val = rule_split(out_dir, name_index(files), labels)
    except DataError as err:
        raise click.ClickException(str(err)) from None
    write_subset(out_dir / f"{VAL_NAME}.txt", [Path(files[i]).name for i in val],
                 f"validation split of {manifest['source']}: {VAL_PER_CLASS} per class by"
                 f" sha256({VAL_KEY!r}/name), outside the other *.txt here;"
                 " made by `python -m barlow.data.subsets --dataset imagefolder`")
    click.echo(f"{out_dir / VAL_NAME}.txt: {len(val)} images")


if __name__ == "__main__":
    main()
