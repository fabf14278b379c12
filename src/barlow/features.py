"""Frozen features and the weighted-kNN monitor: what pretraining's monitor and the
evaluations share, apart from the trainers of barlow.evaluate (so that a change to
those does not rerun pretraining).

A *loader* is any iterable of ``(x, y)`` tensor batches (an FFCV Loader, a DataLoader, a
list); a *backbone* is any module mapping ``x`` to ``(N, D)`` features; it must already
be on ``device``. ``eval_mode``, ``autocast`` and ``to_input`` are the three steps every
forward pass here and in barlow.evaluate takes.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from barlow.progress import Progress

Batches = Iterable[tuple[Tensor, Tensor]]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode, then restore each one's own flag (a caller may
    hold a model whose submodules are in different modes)."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on ``device``'s type; a no-op context for None (fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def to_input(x: Tensor, device: torch.device, channels_last: bool) -> Tensor:
    """A batch of inputs on ``device``, images (4-D) in channels-last layout if asked."""
    x = x.to(device, non_blocking=True)
    if channels_last and x.ndim == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def extract_features(
    backbone: nn.Module,
    loader: Batches,
    device: str | torch.device,
    channels_last: bool = False,
    autocast_dtype: torch.dtype | None = None,
    label: str | None = None,
) -> tuple[Tensor, Tensor]:
    """Run ``backbone`` in eval mode over ``loader``; return (features (N, D) float32,
    labels (N,)) on the CPU, in loader order. Every submodule's training flag is
    restored afterwards. With a ``label``, progress lines name it (barlow.progress)."""
    device = torch.device(device)
    feats, labels = [], []
    progress = (Progress(label, len(loader) if hasattr(loader, "__len__") else None, "batch")
                if label else None)
    # no_grad rather than inference_mode: inference tensors cannot be saved for
    # backward, and fit_linear_on_features trains a head on these very tensors.
    with eval_mode(backbone), torch.no_grad():
        for x, y in loader:
            with autocast(device, autocast_dtype):
                f = backbone(to_input(x, device, channels_last))
            # FFCV reuses its output buffers batch after batch: copy, never keep views.
            feats.append(f.float().to("cpu", copy=True))
            labels.append(y.to("cpu", copy=True))
            if progress is not None:
                progress.update(len(feats))
    if progress is not None:
        progress.finish(len(feats), images=sum(len(y) for y in labels))
    if not feats:
        raise ValueError("extract_features: the loader yielded no batches")
    return torch.cat(feats), torch.cat(labels)


def raw_pixel_features(loader: Batches) -> tuple[Tensor, Tensor]:
    """The raw-pixel baseline: each image flattened to one row, float32 on the CPU."""
    return extract_features(nn.Flatten(), loader, "cpu")


# ----------------------------------------------------------------------------------- kNN
def knn_top1(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    chunk: int = 1024,
) -> float:
    """Weighted kNN top-1 accuracy (percent), the SSL monitor of Wu et al. (2018).

    With f̂ = f / ‖f‖₂, s_ij = f̂_i · f̂_j (cosine similarity of test row i to training
    row j) and N_k(i) the k training rows of largest s_ij:
        score_c(i) = Σ_{j ∈ N_k(i), y_j = c} exp(s_ij / T),   ŷ_i = argmax_c score_c(i).
    Test rows are processed ``chunk`` at a time so the similarity matrix never exceeds
    chunk × N_train; the work runs on ``train_feats``' device."""
    train = F.normalize(train_feats.float(), dim=1)
    train_labels = train_labels.to(train.device)
    k = min(k, train.shape[0])
    correct = 0
    for start in range(0, test_feats.shape[0], chunk):
        query = F.normalize(test_feats[start:start + chunk].to(train.device).float(), dim=1)
        sim, idx = (query @ train.T).topk(k, dim=1)
        votes = torch.zeros(query.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
        truth = test_labels[start:start + chunk].to(train.device)
        correct += int((votes.argmax(dim=1) == truth).sum())
    return 100.0 * correct / test_feats.shape[0]

