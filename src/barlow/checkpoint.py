"""Checkpoints: atomic writes, config fingerprints, RNG state, strict weight loading.

A pretraining checkpoint holds everything a resumed run needs to continue as if it had
never stopped: model, optimiser, grad scaler, step, every RNG state, the logged history,
the config it was made with and the hashes of the code that made it (``code_hashes``).
The data order and augmentations are functions of (seed, epoch, batch) and are rebuilt
from the config and step (barlow.data.loaders).

Every file is read with ``torch.load(weights_only=True)``: tensors and plain containers
only, so a crafted file (a pickle whose objects run code as they are rebuilt, placed by
`dvc pull`, a copied run folder or a colleague) is refused before anything in it runs.
A checkpoint therefore holds only data: the numpy RNG key is stored as a tensor.
"""

from __future__ import annotations

import hashlib
import pickle
import random
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from barlow.config import diff_keys, fingerprint
from barlow.errors import BadInput
from barlow.interrupt import written_whole


class CheckpointError(BadInput):
    """A checkpoint or weights file does not fit the run; the message says why."""


def non_finite_keys(state: Mapping[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict that hold a NaN or an Inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.isfinite().all()]


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save, whole or not at all (barlow.interrupt.written_whole): a crash never
    leaves a torn file, the partial file a kill -9 leaves is the one the next save
    overwrites, and a full disk is a WriteRefused naming the bytes the file needed.

    Saved by file name: torch names the archive's inner folder after the file, so a
    file's bytes depend only on what it holds and where it goes (DVC's hashes of an
    unchanged backbone stay put). torch's own writer reports a refused write as an
    "unexpected pos" or a file it "cannot open"; the same write through a Python file
    then names the OS's error."""
    path = Path(path)
    with written_whole(path, lambda: _serialized_bytes(obj)) as tmp:
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            torch.save(obj, tmp)
        except RuntimeError:
            with open(tmp, "wb") as file:
                torch.save(obj, file)
            raise  # the OS took the bytes: torch's error was not a refused write


class _ByteCounter:
    """A write-only file that keeps no bytes, only their count."""

    def __init__(self) -> None:
        self.count = 0

    def write(self, data: bytes) -> int:
        self.count += len(data)
        return len(data)

    def flush(self) -> None:
        pass


def _serialized_bytes(obj: Any) -> int:
    """The size of ``torch.save(obj)``'s file, found by serialising it into nothing."""
    counter = _ByteCounter()
    torch.save(obj, counter)
    return counter.count


#: What a pretraining checkpoint written before the numpy RNG key was stored as a tensor
#: holds beyond tensors and plain containers: that key, a uint32 numpy array. numpy's
#: array reconstruction, allowed by name, builds arrays and nothing else.
_LEGACY_NUMPY = [np.ndarray, np.dtype, np.dtypes.UInt32DType, np._core.multiarray._reconstruct]


def load_data_only(path: Path, what: str) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU: a file holding anything but
    tensors and plain containers (and ``_LEGACY_NUMPY``) is refused before any of its
    objects is built, with one line naming the file and ``what`` it should have been."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch.save archive (expected {what});"
                              " delete it to start over")
    try:
        with torch.serialization.safe_globals(_LEGACY_NUMPY):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:  # torch's message advises turning weights_only off: wrong here
        raise CheckpointError(
            f"{path}: holds objects other than tensors and plain containers, which could"
            f" run code as they are rebuilt; refused unread (expected {what}). Delete it"
            " to start over") from None
    except Exception as err:  # noqa: BLE001 — a torn or truncated archive
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0]}; expected"
                              f" {what}); delete it to start over") from None


def rng_state() -> dict[str, Any]:
    """The RNG states of Python, numpy, torch's CPU generator and, on a GPU, the current
    device's generator: the one this process draws from. Not every visible GPU's
    (``get_rng_state_all``): restoring those by index fails on a machine with fewer
    GPUs, and they belong to other ranks anyway."""
    name, key, *rest = np.random.get_state()
    state = {"python": random.getstate(),
             "numpy": (name, torch.from_numpy(key.astype(np.int64)), *rest),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore ``rng_state()``'s states; a GPU state goes to the current device, and is
    left out where this process has no GPU (a GPU run resumed on the CPU). The numpy
    key is a tensor (a numpy array in checkpoints written before: both convert)."""
    random.setstate(state["python"])
    name, key, *rest = state["numpy"]
    np.random.set_state((name, np.asarray(key).astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def code_hashes(packages: Sequence[str] = ("barlow", "stages")) -> dict[str, str]:
    """Module name -> sha256 (16 hex digits) of its source, for every module of
    ``packages`` this process has imported: the code that computes the weights."""
    hashes = {}
    for name, module in sorted(sys.modules.items()):
        source = getattr(module, "__file__", None)
        if name.split(".")[0] in packages and source:
            hashes[name] = hashlib.sha256(Path(source).read_bytes()).hexdigest()[:16]
    return hashes


def changed_code(saved: Mapping[str, str] | None, now: Mapping[str, str]) -> list[str]:
    """Modules whose source differs between a checkpoint's ``code_hashes`` and this
    process's, among those both imported; ["(not recorded)"] for a checkpoint written
    before the hashes were kept."""
    if saved is None:
        return ["(not recorded)"]
    return sorted(name for name in set(saved) & set(now) if saved[name] != now[name])


def load_resumable(path: str | Path, config: Mapping[str, Any],
                   code: Mapping[str, str] | None = None,
                   log: Callable[[str], None] = print,
                   what: str = "a pretraining checkpoint of this project") -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is one, after checking it was made with
    ``config``; None when there is none, or when it is a finished run's made with other
    params. An unfinished checkpoint (an interrupted run) from another config is refused
    with the keys that differ (delete it, or restore the params, to go on).

    ``code`` (``code_hashes()``): a finished run's checkpoint written by other code is
    not this code's product either. DVC reruns the stage because a code dep changed, and
    the run starts over instead of re-exporting the old weights (the checkpoint is a
    persistent output). An interrupted run's is resumed, the usual way on after fixing
    what stopped it, with a line through ``log`` naming the changed modules. ``what``:
    the kind of checkpoint expected, in the errors."""
    path = Path(path)
    if not path.is_file():
        return None
    ckpt = load_data_only(path, what)
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise CheckpointError(f"{path}: not {what}")
    if ckpt.get("fingerprint") != fingerprint(config):
        if ckpt.get("finished"):
            # A finished run's checkpoint is a product, not a resume point: with new
            # params (dvc exp run -S ...) the stage starts over and replaces it.
            return None
        changes = diff_keys(ckpt["config"], config)
        raise CheckpointError(
            f"{path}: made with another config; differing keys: " + "; ".join(changes[:10])
            + ". Restore those params to resume, or delete the checkpoint to start over.")
    changed = [] if code is None else changed_code(ckpt.get("code"), code)
    if changed and ckpt.get("finished"):
        log(f"{path}: a finished run of other code (changed: {', '.join(changed[:5])});"
            " starting over")
        return None
    if changed:
        log(f"{path}: resuming an interrupted run although the code changed since"
            f" (changed: {', '.join(changed[:5])})")
    return ckpt


WEIGHTS_HINT = ("give --weights a backbone's weights: models/pretrain/backbone.pt, the"
                " official resnet50.pth, or the official full checkpoint.pth")


def backbone_state(path: Path, content: Any) -> dict[str, torch.Tensor]:
    """The backbone's state dict (torchvision layout, no "module." prefix) in a weights
    file's content: a plain state dict (our ``backbone.pt``, the official
    ``resnet50.pth``), ``{"state_dict": ...}``, or the official full ``checkpoint.pth`` of
    facebookresearch/barlowtwins main.py, ``{"epoch", "model", "optimizer"}`` with
    ``model`` the BarlowTwins module's state dict (``backbone.*``, ``projector.*``,
    ``bn.*``, "module."-prefixed when saved from DDP), whose ``backbone.*`` is kept."""
    if isinstance(content, Mapping) and "state_dict" in content:
        content = content["state_dict"]
    full = isinstance(content, Mapping) and isinstance(content.get("model"), Mapping)
    if full:
        content = content["model"]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor)
                                                   for v in content.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors; {WEIGHTS_HINT}")
    state = {k.removeprefix("module."): v for k, v in content.items()}
    if full:
        if not any(k.startswith("backbone.") for k in state):
            raise CheckpointError(f"{path}: its 'model' has no 'backbone.*' weights;"
                                  f" {WEIGHTS_HINT}")
        state = {k.removeprefix("backbone."): v for k, v in state.items()
                 if k.startswith("backbone.")}
    return state


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a backbone's weights strictly from any file backbone_state reads. Only
    ``fc.*`` may be absent or extra (the head is the evaluation's own); anything else,
    or a NaN/Inf value, is an error naming the keys or shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        content = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — torch's message advises turning weights_only off: wrong here
        raise CheckpointError(f"{path}: {_not_weights(path)}; {WEIGHTS_HINT}") from None
    state = {k: v for k, v in backbone_state(path, content).items() if not k.startswith("fc.")}
    broken = non_finite_keys(state)
    if broken:
        # A diverged run's weights load without complaint and evaluate to chance.
        raise CheckpointError(f"{path}: non-finite weights (NaN or Inf) in {len(broken)}"
                              f" tensors, first {broken[0]}: the run that wrote it diverged")
    own = backbone.state_dict()
    missing = sorted(k for k in own if k not in state and not k.startswith("fc."))
    unexpected = sorted(k for k in state if k not in own)
    wrong = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
             for k, v in state.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: does not fit the backbone (model.* params): "
            + "; ".join(filter(None, [
                f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}" if missing else "",
                f"unexpected keys {unexpected[:5]}" if unexpected else "",
                f"wrong shapes {wrong[:5]}" if wrong else ""])))
    backbone.load_state_dict(state, strict=False)


def _not_weights(path: Path) -> str:
    """What a file torch.load(weights_only=True) refused is, in words: torch.save
    writes zip archives; one that holds more than tensors and plain containers is a
    pickle of objects, such as this project's pretraining checkpoint.pt."""
    if not zipfile.is_zipfile(path):
        return "not a torch weights file (not a torch.save archive)"
    return ("a torch file holding objects other than tensors (a training checkpoint such"
            " as checkpoint.pt?)")
