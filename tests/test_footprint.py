"""barlow.footprint: the bytes an evaluation's gathered features hold per rank, against
the formula rows · D · 4, and the refusals of what the host or the GPU cannot hold."""

from __future__ import annotations

from barlow.config import ModelConfig
from barlow.footprint import Gathered, feature_dim, per_embedding, refusal

RESNET50 = ModelConfig(arch="resnet50", width=64, layers=(2, 2, 2, 2), projector="8192",
                       projector_bn=True)
# The paper's linear evaluation (augment mode): the test split, 50,000 images at 224 px.
PAPER = per_embedding(["barlow", "random_init", "raw_pixels"], {"test": 50_000}, "linear",
                      ("linear.mode", "augment"), RESNET50, 224)


def test_bytes_are_rows_times_features_times_four():
    assert [(g.key, g.value, g.dim) for g in PAPER] == [
        ("linear.mode", "augment", 2048), ("linear.baselines", "random_init", 2048),
        ("linear.baselines", "raw_pixels", 150_528)]
    assert PAPER[2].bytes == 50_000 * 3 * 224 * 224 * 4 == 30_105_600_000
    both = Gathered("linear.mode", "features", {"train": 1_281_167, "test": 50_000}, 2048)
    assert both.bytes == (1_281_167 + 50_000) * 2048 * 4
    assert feature_dim("raw_pixels", RESNET50, 28) == 2352


def test_what_the_host_or_the_gpu_cannot_hold_is_refused():
    raw = PAPER[2]
    assert refusal(raw, ranks_on_node=1, host_available=raw.bytes, device_free=None) is None
    assert refusal(raw, 8, 8 * raw.bytes - 1, None) is not None
    assert refusal(raw, 8, 7 * raw.bytes, None) == (
        "raw_pixels gathers 50,000 test rows × 150,528 float32 features on every rank:"
        " 30.1 GB, × 8 rank(s) on this node = 240.8 GB, more than the 210.7 GB of host"
        " memory available")
    assert refusal(raw, 8, 10**12, device_free=80 * 10**9) is None
    assert refusal(raw, 8, 10**12, device_free=raw.bytes - 1) is not None
    assert refusal(raw, 8, 10**12, device_free=24 * 10**9) == (
        "raw_pixels gathers 50,000 test rows × 150,528 float32 features on every rank:"
        " 30.1 GB, more than the 24.0 GB free on the GPU")
    # The pretrained backbone's 2048-d features fit where the pixels do not.
    assert refusal(PAPER[0], 8, 10**11, 40 * 10**9) is None
