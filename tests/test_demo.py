"""The main job end to end on a tiny, coarse phantom: every stage runs, the table covers every organ, a rerun
reuses the dataset and the CPU settings are the ones the README documents."""
import json

import pytest

from fastseg.training.demo import CPU_SETTINGS, run_demo


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    table = run_demo(out, iterations=3, device="cpu", n_train=3, n_test=1, spacing=(6.0, 6.0, 9.0))
    return out, table


def test_demo_writes_every_stage(demo_run):
    out, table = demo_run
    organs = json.loads((out / "data" / "dataset.json").read_text())["organs"]
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| Organ")]
    assert [r.split("|")[1].strip() for r in rows] == organs
    assert (out / "model" / "model_final.pt").is_file()
    assert [p.name for p in (out / "predictions").iterdir()] == ["phantom_003.nii.gz"]
    assert (out / "evaluation").is_dir() and any((out / "evaluation").iterdir())


def test_demo_uses_the_cpu_settings(demo_run):
    out, _ = demo_run
    config = json.loads((out / "model" / "config.json").read_text())
    for key, value in CPU_SETTINGS.items():
        expected = 3 if key == "iterations" else value
        assert config[key] == expected, key


def test_demo_rerun_keeps_the_dataset(demo_run, capsys):
    out, _ = demo_run
    description = out / "data" / "dataset.json"
    before = description.stat().st_mtime_ns
    run_demo(out, iterations=3, device="cpu", n_train=3, n_test=1, spacing=(6.0, 6.0, 9.0))
    assert description.stat().st_mtime_ns == before
    assert "writing" not in capsys.readouterr().out
