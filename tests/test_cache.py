"""The disk cache of preprocessed cases: the same arrays and plan as without it, no case read on a warm run,
misses on changed files or settings, corrupt entries rewritten, clear errors."""
import os

import numpy as np
import pytest

from fastseg.data.dataset import DatasetSpec, write_dataset_description
from fastseg.data.io import Image, write_image
from fastseg.training import TrainConfig, Trainer

ORGANS = ["Ball", "Cube"]
SHAPE = (20, 22, 12)


def _case(seed):
    rng = np.random.default_rng(seed)
    label = np.zeros(SHAPE, np.uint8)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in SHAPE], indexing="ij"), -1)
    label[np.linalg.norm(grid - [10, 11, 6] - rng.integers(-2, 3, 3), axis=-1) < 5] = 1
    c = rng.integers(2, 5, 3)
    label[c[0]:c[0] + 3, c[1]:c[1] + 3, c[2]:c[2] + 2] = 2
    image = np.where(label == 1, 300.0, np.where(label == 2, 900.0, -100.0)) + rng.normal(0, 20, SHAPE)
    return image.astype(np.float32), label


@pytest.fixture
def dataset(tmp_path):
    root = tmp_path / "data"
    names = [f"case{i}" for i in range(4)]
    for i, name in enumerate(names):
        image, label = _case(i)
        spacing = (2.0, 2.0, 3.0) if i % 2 == 0 else (1.8, 2.1, 3.0)  # resampled to the median
        write_image(root / "images" / f"{name}.nii.gz", Image(image, spacing=spacing))
        write_image(root / "labels" / f"{name}.nii.gz", Image(label, spacing=spacing))
    write_dataset_description(root / "dataset.json", organs=ORGANS, name="cache", image="images/{case}.nii.gz",
                              label="labels/{case}.nii.gz", splits={"train": names[:3], "val": names[3:]})
    return root / "dataset.json"


def _prepared(dataset, tmp_path, **changes):
    cfg = TrainConfig(dataset=str(dataset), output_dir=str(tmp_path / "run"), patch_size=[16, 16, 8],
                      base_features=4, max_features=16, device="cpu", **changes)
    trainer = Trainer(cfg, progress=False)
    trainer.prepare_data()
    return trainer


def _assert_same(a: Trainer, b: Trainer):
    assert a.plan == b.plan
    for x, y in zip(a.train_cases + a.val_cases, b.train_cases + b.val_cases):
        assert x.name == y.name
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.label, y.label)
        assert x.image.dtype == y.image.dtype and x.label.dtype == y.label.dtype


def _count_reads(monkeypatch):
    reads = []
    real = DatasetSpec.load_case
    monkeypatch.setattr(DatasetSpec, "load_case", lambda self, name, **kw: reads.append(name) or real(self, name, **kw))
    return reads


def test_cold_and_warm_runs_equal_the_uncached_preparation(dataset, tmp_path, monkeypatch):
    plain = _prepared(dataset, tmp_path)
    cache = tmp_path / "cache"
    reads = _count_reads(monkeypatch)
    cold = _prepared(dataset, tmp_path, cache_dir=str(cache))
    assert sorted(reads) == ["case0", "case1", "case2", "case3"]  # each case read once
    _assert_same(plain, cold)
    assert len(list(cache.glob("*.json"))) == 4 and len(list(cache.glob("*.npz"))) == 4
    reads.clear()
    warm = _prepared(dataset, tmp_path, cache_dir=str(cache))
    assert reads == []
    _assert_same(plain, warm)


def test_new_settings_and_changed_files_miss(dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _prepared(dataset, tmp_path, cache_dir=str(cache))
    reads = _count_reads(monkeypatch)
    other = _prepared(dataset, tmp_path, cache_dir=str(cache), target_spacing=[3.0, 3.0, 3.0])
    assert sorted(reads) == ["case0", "case1", "case2", "case3"] and len(list(cache.glob("*.npz"))) == 8
    _assert_same(_prepared(dataset, tmp_path, target_spacing=[3.0, 3.0, 3.0]), other)

    label_path = dataset.parent / "labels" / "case1.nii.gz"
    _, label = _case(99)
    write_image(label_path, Image(label, spacing=(1.8, 2.1, 3.0)))
    os.utime(label_path, ns=(1, 1))  # a rewrite within the mtime's resolution still changes the key
    reads.clear()
    changed = _prepared(dataset, tmp_path, cache_dir=str(cache))
    assert reads == ["case1"]
    _assert_same(_prepared(dataset, tmp_path), changed)


def test_corrupt_entries_are_rewritten(dataset, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    plain = _prepared(dataset, tmp_path, cache_dir=str(cache))
    npz = sorted(cache.glob("case2-*.npz"))[0]
    npz.write_bytes(npz.read_bytes()[:100])
    meta = sorted(cache.glob("case0-*.json"))[0]
    meta.write_text("{not json")
    reads = _count_reads(monkeypatch)
    again = _prepared(dataset, tmp_path, cache_dir=str(cache))
    assert sorted(reads) == ["case0", "case2"]
    _assert_same(plain, again)
    assert not [p for p in cache.iterdir() if ".tmp" in p.name]


def test_training_through_the_cache(dataset, tmp_path):
    cfg = TrainConfig(dataset=str(dataset), output_dir=str(tmp_path / "run"), patch_size=[16, 16, 8],
                      base_features=4, max_features=16, device="cpu", iterations=2, val_every=0,
                      checkpoint_every=0, num_workers=0, cache_dir=str(tmp_path / "cache"))
    result = Trainer(cfg, progress=False).fit()
    assert result["iteration"] == 2


def test_cache_errors(dataset, tmp_path):
    with pytest.raises(ValueError, match="cache_dir: expected a folder path or null"):
        TrainConfig(dataset=str(dataset), cache_dir="")
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("x")
    with pytest.raises(NotADirectoryError, match="cache_dir: expected a folder, got the file"):
        _prepared(dataset, tmp_path, cache_dir=str(not_a_folder))
    os.remove(dataset.parent / "images" / "case3.nii.gz")
    with pytest.raises(FileNotFoundError, match="case3"):
        _prepared(dataset, tmp_path, cache_dir=str(tmp_path / "cache"))
