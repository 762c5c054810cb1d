"""The digit feature network and its measures: held-out accuracy, FD-digits (≈ 0 for data against itself, large for
noise), label accuracy, input conventions, the shared split, refusals of bad classifier files, and training."""
from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from epd.backbones.gmm import load_digit_images
from epd.data import digit_split, split_indices
from epd.io import WeightsError
from epd.metrics.digits import (
    as_pixels,
    data_pixels,
    digit_features,
    fd_digits,
    fd_digits_stats,
    label_accuracy,
    load_digit_classifier,
)
from epd.train_backbone import ClassifierTrainConfig, train_classifier


@pytest.fixture(scope="module")
def clf():
    return load_digit_classifier()


@pytest.fixture(scope="module")
def data():
    train, train_labels = data_pixels("train")
    held, held_labels = data_pixels("held_out")
    return {"train": train, "train_labels": train_labels, "held": held, "held_labels": held_labels}


# ---------------------------------------------------------------------------------------------------------------- split
def test_split_is_stratified_disjoint_and_fixed():
    s = digit_split()
    assert len(s.train_index) + len(s.held_out_index) == 1797
    assert not set(s.train_index) & set(s.held_out_index)
    counts = np.bincount(s.held_out_labels.numpy(), minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37                           # 20 % of each class
    train, held = split_indices(load_digit_images()[1].numpy())
    assert np.array_equal(train, s.train_index) and np.array_equal(held, s.held_out_index)
    assert s.describe()["held_out"] == 359


# ------------------------------------------------------------------------------------------------------------- accuracy
def test_held_out_accuracy(clf, data):
    acc = label_accuracy(data["held"], data["held_labels"], clf)
    print(f"classifier held-out accuracy {acc:.4f}")
    assert acc >= 0.97
    assert acc == pytest.approx(clf.header["provenance"]["metrics"]["held_out_accuracy"])


def test_label_accuracy_conventions(clf, data):
    held, labels = data["held"], data["held_labels"]
    wrong = (labels + 1) % 10
    assert label_accuracy(held, wrong, clf) < 0.05
    half = torch.where(torch.arange(len(labels)) % 2 == 0, labels, -1)          # −1 rows are skipped
    assert label_accuracy(held, half, clf) == label_accuracy(held[::2], labels[::2], clf)
    with pytest.raises(ValueError, match="one label per image"):
        label_accuracy(held, labels[:3], clf)
    with pytest.raises(ValueError, match="at least one labelled image"):
        label_accuracy(held, torch.full_like(labels, -1), clf)


# ----------------------------------------------------------------------------------------------------------- FD-digits
def test_fd_of_data_against_itself_is_zero(clf, data):
    assert abs(fd_digits(data["train"], data["train"], clf)) < 1e-3
    assert abs(fd_digits(data["held"], data["held"], clf)) < 1e-3


def test_fd_of_noise_is_large(clf, data):
    g = torch.Generator().manual_seed(0)
    train = fd_digits_stats(data["train"], clf)
    held = fd_digits(data["held"], train, clf)
    noise = fd_digits(torch.rand(1000, 1, 8, 8, generator=g), train, clf)
    blank = fd_digits(torch.zeros(100, 1, 8, 8) + 0.01 * torch.rand(100, 1, 8, 8, generator=g), train, clf)
    print(f"FD-digits vs train: held-out {held:.2f}, uniform noise {noise:.1f}, blank {blank:.1f}")
    assert 0 < held < 20
    assert noise > 50 * held and blank > 50 * held


def test_fd_sees_blur_and_shifts(clf, data):
    train = fd_digits_stats(data["train"], clf)
    held = fd_digits(data["held"], train, clf)
    blurred = torch.nn.functional.avg_pool2d(data["held"], 3, 1, 1, count_include_pad=False)
    shifted = torch.roll(data["held"], 1, dims=3)
    assert fd_digits(blurred, train, clf) > 10 * held
    assert fd_digits(shifted, train, clf) > 5 * held


def test_fd_forms_agree(clf, data):
    a, b = data["held"], data["train"][:500]
    assert fd_digits(a, b, clf) == pytest.approx(fd_digits(a, fd_digits_stats(b, clf), clf))
    assert fd_digits(a, b, clf) == pytest.approx(fd_digits(b, a, clf), rel=1e-6)
    assert fd_digits(a, b) == pytest.approx(fd_digits(a, b, clf))              # default: the shipped classifier


def test_input_conventions(clf, data):
    px = data["held"][:16]
    as_uint8 = (px * 255).round().to(torch.uint8)
    f_float, f_u8 = digit_features(px, clf), digit_features(as_uint8.squeeze(1), clf)
    assert f_float.shape == (16, 64)
    assert torch.allclose(f_float, f_u8, atol=0.05)    # uint8 rounds pixels by up to 1/510
    assert torch.equal(as_pixels(as_uint8), as_pixels(as_uint8.squeeze(1)))
    with pytest.raises(ValueError, match=r"pixels must lie in \[0, 1\] \(use Backbone.to_pixels\)"):
        as_pixels(px * 2 - 1)
    with pytest.raises(ValueError, match=r"expected digit images \[B, 1, H, W\]"):
        as_pixels(px.repeat(1, 3, 1, 1))


def test_features_of_a_sample_do_not_depend_on_its_batch(clf, data):
    px = data["held"][:40]
    assert torch.allclose(digit_features(px, clf)[:5], digit_features(px[:5], clf), atol=1e-5)


# ------------------------------------------------------------------------------------------------------------ refusals


def test_missing_classifier(tmp_path):
    with pytest.raises(WeightsError, match=r"weights file missing: .*none\.json\. Make it with "
                                           r"`epd train-backbone --what classifier`"):
        load_digit_classifier(tmp_path / "none")


def test_unet_offered_as_classifier(copy):
    with pytest.raises(WeightsError, match=r"holds weights of a 'unet-digits' network, not 'digit-classifier'"):
        load_digit_classifier(copy / "unet-digits")


def test_corrupt_classifier(copy):
    st = copy / "digit-classifier.safetensors"
    st.write_bytes(st.read_bytes()[:-10])
    with pytest.raises(WeightsError, match="does not match the checksum"):
        load_digit_classifier(copy / "digit-classifier")


def test_mismatched_classifier(copy):
    js = copy / "digit-classifier.json"
    h = json.loads(js.read_text())
    h["config"]["feature_dim"] = 32
    js.write_text(json.dumps(h))
    with pytest.raises(WeightsError, match="tensor shapes do not match the architecture"):
        load_digit_classifier(copy / "digit-classifier")


def test_classifier_cache_sees_a_rewritten_file(copy):
    first = load_digit_classifier(copy / "digit-classifier")
    assert load_digit_classifier(copy / "digit-classifier.json") is first
    st = copy / "digit-classifier.safetensors"
    st.write_bytes(b"garbage")
    os.utime(st, ns=(st.stat().st_atime_ns, st.stat().st_mtime_ns + 10**9))
    with pytest.raises(WeightsError, match="does not match the checksum"):
        load_digit_classifier(copy / "digit-classifier")


# ------------------------------------------------------------------------------------------------------------- training
def test_training_writes_valid_reproducible_files(tmp_path):
    cfg = ClassifierTrainConfig(epochs=1, batch_size=256)
    paths = [train_classifier(tmp_path / d, cfg, progress=False) for d in ("a", "b")]
    assert sorted(os.listdir(tmp_path / "a")) == ["digit-classifier.json", "digit-classifier.log.csv",
                                                  "digit-classifier.safetensors"]
    clf = load_digit_classifier(paths[0])
    h = json.loads(paths[0].read_text())
    assert h["provenance"]["training"]["epochs"] == 1 and 0 <= h["provenance"]["metrics"]["held_out_accuracy"] <= 1
    assert clf.header["tensors_sha256"] == json.loads(paths[1].read_text())["tensors_sha256"]
    st = paths[0].with_suffix(".safetensors")
    assert h["tensors_sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    assert torch.get_num_threads() == 1   # training restores the caller's thread count
