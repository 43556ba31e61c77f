"""Studies: resume after a crash, atomic results, report from results.jsonl alone."""

from __future__ import annotations

import json

import pytest

from ridgeline.errors import ConfigError
from ridgeline.study import ResultStore, config_from_dict, load_config, run_study
from ridgeline.study.registry import Options, register_measurement

CALLS: dict[str, int] = {}
FAIL_ONCE: set[str] = set()


class ProbeOptions(Options):
    label: str = "x"


def _probe_report(record: dict) -> str:
    return f"<p>probe {record['options']['label']} = {record['result']['value']}</p>"


@register_measurement("probe", options=ProbeOptions, report=_probe_report,
                      summary=lambda r: {"value": r["result"]["value"]})
def _probe(ctx, options: ProbeOptions) -> dict:
    CALLS[options.label] = CALLS.get(options.label, 0) + 1
    if options.label in FAIL_ONCE:
        FAIL_ONCE.discard(options.label)
        raise RuntimeError("simulated crash")
    model = ctx.model("a")  # trained model from its checkpoint
    return {"value": float(sum(p.detach().sum() for p in model.parameters())), "label": options.label}


def tiny_config(**extra) -> dict:
    return {
        "name": "tiny",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 120, "dim": 4, "num_classes": 3}},
        "training": {"epochs": 1, "batch_size": 32},
        "models": [{"name": "a", "factory": "mlp",
                    "args": {"in_features": 4, "widths": [8], "out_features": 3}}],
        "measurements": [{"kind": "probe", "id": "first", "label": "one"},
                         {"kind": "probe", "id": "second", "label": "two"}],
        **extra,
    }


def test_study_resumes_after_a_crash_without_recomputing(tmp_path):
    CALLS.clear()
    FAIL_ONCE.add("two")
    config = config_from_dict(tiny_config())
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_study(config, tmp_path, progress=False)
    ids = [r["id"] for r in ResultStore(tmp_path).records()]
    assert ids == ["study", "train:a", "first"]  # finished work is on disk
    checkpoint = (tmp_path / "checkpoints" / "a.safetensors").stat().st_mtime_ns

    outcome = run_study(config, tmp_path, progress=False)
    assert outcome.ran == ["second"] and outcome.skipped == ["train:a", "first"]
    assert CALLS == {"one": 1, "two": 2}
    assert (tmp_path / "checkpoints" / "a.safetensors").stat().st_mtime_ns == checkpoint
    records = ResultStore(tmp_path).records()
    assert [r["id"] for r in records] == ["study", "train:a", "first", "second"]

    html = (tmp_path / "report.html").read_text()
    for ident in ("train:a", "first", "second"):
        assert f'id="{ident}"' in html
    assert "probe two =" in html and "<svg" in html  # the training curves are embedded


def test_half_written_line_is_ignored_and_redone(tmp_path):
    CALLS.clear()
    config = config_from_dict(tiny_config())
    run_study(config, tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # crash mid-write
    assert [r["id"] for r in ResultStore(tmp_path).records()][-1] == "first"
    with pytest.warns(UserWarning, match="1 unreadable line"):  # reported, then moved out
        outcome = run_study(config, tmp_path, progress=False)
    assert outcome.ran == ["second"]
    assert [r["id"] for r in ResultStore(tmp_path).records()][-1] == "second"
    assert sum(1 for r in ResultStore(tmp_path).records() if r["id"] == "second") == 1


def test_changed_options_rerun_only_that_measurement(tmp_path):
    CALLS.clear()
    run_study(config_from_dict(tiny_config()), tmp_path, progress=False)
    changed = tiny_config()
    changed["measurements"][1]["label"] = "three"
    outcome = run_study(config_from_dict(changed), tmp_path, progress=False)
    assert outcome.ran == ["second"]
    assert ResultStore(tmp_path).latest()["second"]["result"]["label"] == "three"


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key 'trainig'"):
        config_from_dict({**tiny_config(), "trainig": {}})
    with pytest.raises(ConfigError, match="unknown option 'lable'"):
        run_study(config_from_dict(tiny_config(measurements=[{"kind": "probe", "lable": "x"}])),
                  "/nonexistent/never-written", progress=False)
    with pytest.raises(ConfigError, match="unknown measurement kind 'bogus'"):
        run_study(config_from_dict(tiny_config(measurements=[{"kind": "bogus"}])),
                  "/nonexistent/never-written", progress=False)
    with pytest.raises(ConfigError, match="no preset 'huge'"):
        load_config(preset="huge")


def test_default_config_and_presets_validate():
    config = load_config()
    assert [m.name for m in config.models] == ["a", "b", "c", "t1", "t2"]
    assert {m.factory for m in config.models} == {"mlp", "transformer"}
    assert len(config.measurements) >= 10  # every instrument has a measurement
    quick = load_config(preset="quick")
    assert quick.training.epochs < config.training.epochs
    assert quick.data.train_subset is not None


def test_store_writes_one_json_line_per_record(tmp_path):
    import torch

    store = ResultStore(tmp_path)
    store.append({"id": "x", "result": {"t": torch.arange(3.0), "nan": float("nan")}})
    line = (tmp_path / "results.jsonl").read_text()
    assert line.endswith("\n") and json.loads(line)["result"] == {"t": [0.0, 1.0, 2.0], "nan": None}
