"""Checkpoints: atomic writes, config fingerprints, RNG state, strict weight loading.

A pretraining checkpoint holds everything a resumed run needs to continue as if it had
never stopped: model, optimiser, grad scaler, step, every RNG state, the logged history,
and the config it was made with. The data order and augmentations are functions of
(seed, epoch, batch) and are rebuilt from the config and step (barlow.data.loaders).
"""

from __future__ import annotations

import os
import random
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from barlow.config import diff_keys, fingerprint
from barlow.interrupt import partial_path


class CheckpointError(ValueError):
    """A checkpoint or weights file does not fit the run; the message says why."""


def save_atomic(obj: Any, path: str | Path) -> None:
    """torch.save to partial_path(path), then rename: a crash never leaves a torn file,
    and the partial file a kill -9 leaves is the one the next save overwrites."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = partial_path(path)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def load_resumable(path: str | Path, config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The checkpoint at ``path`` if there is one, after checking it was made with
    ``config``; None when there is none, or when it is a finished run's made with other
    params. An unfinished checkpoint (an interrupted run) from another config is refused
    with the keys that differ (delete it, or restore the params, to go on)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        # Our own file (it holds numpy RNG state, which weights_only refuses).
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 — any unpickling failure means "unusable"
        raise CheckpointError(f"{path}: unreadable checkpoint ({err}); delete it to start over") from None
    if not isinstance(ckpt, dict) or "config" not in ckpt:
        raise CheckpointError(f"{path}: not a pretraining checkpoint of this project")
    if ckpt.get("fingerprint") != fingerprint(config):
        if ckpt.get("finished"):
            # A finished run's checkpoint is a product, not a resume point: with new
            # params (dvc exp run -S ...) the stage starts over and replaces it.
            return None
        changes = diff_keys(ckpt["config"], config)
        raise CheckpointError(
            f"{path}: made with another config; differing keys: " + "; ".join(changes[:10])
            + ". Restore those params to resume, or delete the checkpoint to start over.")
    return ckpt


def load_backbone_weights(backbone: nn.Module, path: str | Path) -> None:
    """Load a torchvision-layout backbone state dict strictly: our exported
    ``backbone.pt`` or the official Barlow Twins ``resnet50.pth``. Only ``fc.*`` may be
    absent or extra (the head is the evaluation's own); anything else is an error naming
    the keys or shapes."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weights file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 — torch's message advises weights_only=False: wrong here
        raise CheckpointError(f"{path}: {_not_weights(path)}") from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors")
    state = {k.removeprefix("module."): v for k, v in state.items() if not k.startswith("fc.")}
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
    # A diverged run's weights load without complaint and evaluate to chance.
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{path}: non-finite weights (NaN or Inf) in {len(bad)} tensors,"
                              f" first {bad[0]}: the run that wrote it diverged")
    backbone.load_state_dict(state, strict=False)


def _not_weights(path: Path) -> str:
    """What a file torch.load(weights_only=True) refused is, in words: torch.save
    writes zip archives; one that holds more than tensors and plain containers is a
    pickle of objects, such as this project's pretraining checkpoint.pt."""
    if not zipfile.is_zipfile(path):
        return ("not a torch weights file (not a torch.save archive); expected a backbone"
                " state dict such as the pretrain stage's backbone.pt")
    return ("a torch file holding objects other than tensors (a training checkpoint such"
            " as checkpoint.pt?); expected a backbone state dict such as the pretrain"
            " stage's backbone.pt")
