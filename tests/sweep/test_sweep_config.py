"""The [sweep] table: grid × seeds expansion, stable ids, and bad input refused before work."""

from __future__ import annotations

import socket

import pytest

from ridgeline.errors import ConfigError, DistributedError
from ridgeline.study import config_from_dict
from ridgeline.sweep import expand_sweep, make_engine, run_sweep


def sweep_config(grid=None, seeds=(0, 1), measurements=None, **extra) -> dict:
    return {
        "name": "grid",
        "data": {"name": "gaussian_mixture", "args": {"num_samples": 96, "dim": 4, "num_classes": 3}},
        "training": {"epochs": 1, "batch_size": 32},
        "models": [{"name": "m", "factory": "mlp",
                    "args": {"in_features": 4, "widths": [8], "out_features": 3}}],
        "sweep": {"seeds": list(seeds),
                  "grid": grid if grid is not None else {"training.lr": [0.02, 0.1],
                                                          "models.m.args.widths": [[8], [16]]},
                  "measurements": measurements if measurements is not None
                  else [{"kind": "curvature", "subset": 50, "k": 1}]},
        **extra,
    }


def test_expansion_is_the_grid_times_the_seeds_with_settings_applied():
    tasks = expand_sweep(config_from_dict(sweep_config()))
    assert len(tasks) == 2 * 2 * 2
    assert len({t.id for t in tasks}) == 8
    for task in tasks:
        model = task.study["models"][0]
        assert model["name"] == task.id and task.id.startswith("m-")
        assert model["args"]["widths"] == task.settings["models.m.args.widths"]
        assert model["init_seed"] == task.settings["seed"] == model["training"]["seed"]
        assert task.study["training"]["lr"] == task.settings["training.lr"]
        curvature = task.plan[1]
        assert curvature.id == f"curvature:{task.id}" and curvature.options["models"] == [task.id]


def test_ids_are_stable_when_the_grid_grows_and_fingerprints_follow_the_config():
    small = {(t.settings["training.lr"], t.settings["seed"]): t
             for t in expand_sweep(config_from_dict(sweep_config({"training.lr": [0.02, 0.1]})))}
    large = {(t.settings["training.lr"], t.settings["seed"]): t
             for t in expand_sweep(config_from_dict(sweep_config({"training.lr": [0.02, 0.1, 0.5]})))}
    assert all(large[key].id == task.id and large[key].fingerprint == task.fingerprint
               for key, task in small.items())
    longer = sweep_config({"training.lr": [0.02, 0.1]})
    longer["training"]["epochs"] = 2
    changed = {(t.settings["training.lr"], t.settings["seed"]): t
               for t in expand_sweep(config_from_dict(longer))}
    assert all(changed[k].id == t.id and changed[k].fingerprint != t.fingerprint
               for k, t in small.items())


def test_unknown_grid_key_lists_the_valid_keys():
    with pytest.raises(ConfigError, match=r"'training.lrate' names no config field.*training\.lr"):
        expand_sweep(config_from_dict(sweep_config({"training.lrate": [0.1]})))
    with pytest.raises(ConfigError, match="no model 'x'"):
        expand_sweep(config_from_dict(sweep_config({"models.x.args.widths": [[4]]})))


def test_empty_grid_and_empty_values_are_refused():
    with pytest.raises(ConfigError, match="grid is empty"):
        expand_sweep(config_from_dict(sweep_config({})))
    with pytest.raises(ConfigError, match=r"no values for \['training.lr'\]"):
        expand_sweep(config_from_dict(sweep_config({"training.lr": []})))


def test_pair_measurement_in_a_sweep_says_it_needs_two_models(tmp_path):
    config = config_from_dict(sweep_config(measurements=[{"kind": "connectivity"}]))
    with pytest.raises(ConfigError, match="compares a pair of models"):
        run_sweep(config, tmp_path / "run", engine="inprocess", progress=False)
    assert not (tmp_path / "run").exists()  # refused before any work


def test_bad_values_and_options_are_found_before_work():
    with pytest.raises(ConfigError, match="batch_size"):
        expand_sweep(config_from_dict(sweep_config({"training.batch_size": ["many"]})))
    with pytest.raises(ConfigError, match="unknown option 'kk'"):
        expand_sweep(config_from_dict(sweep_config(measurements=[{"kind": "curvature", "kk": 1}])))
    with pytest.raises(ConfigError, match="remove it"):
        expand_sweep(config_from_dict(sweep_config(measurements=[{"kind": "curvature",
                                                                  "models": ["m"]}])))


def test_ray_engine_without_ray_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ConfigError, match=r"ridgeline\[ray\]"):
        make_engine("ray")


def test_unreachable_ray_address_is_a_clear_error():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(DistributedError, match="unreachable"):
        make_engine("ray", address=f"ray://127.0.0.1:{port}")
    with pytest.raises(ConfigError, match="HOST:PORT"):
        make_engine("ray", address="nowhere")


def test_a_folder_holding_another_run_is_refused(tmp_path):
    from ridgeline.study import ResultStore

    ResultStore(tmp_path).append({"id": "study", "kind": "study", "status": "ok",
                                  "result": {"name": "other"}})
    with pytest.raises(ConfigError, match="holds the study 'other'"):
        run_sweep(config_from_dict(sweep_config()), tmp_path, engine="inprocess", progress=False)


def test_a_failing_task_is_recorded_as_an_error_and_retried_on_resume(tmp_path):
    from ridgeline.study import ResultStore

    config = config_from_dict(sweep_config({"training.lr": [0.05, 1e12]}, measurements=[]))
    outcome = run_sweep(config, tmp_path, engine="inprocess", progress=False, report=False)
    assert len(outcome.ran) == 2 and len(outcome.failed) == 2
    assert all("NonFiniteLossError" in message for message in outcome.failed.values())
    latest = ResultStore(tmp_path).latest()
    errors = [r for r in latest.values() if r.get("status") == "error"]
    assert sorted(r["id"] for r in errors) == sorted(f"model:{i}" for i in outcome.failed)
    assert len(latest["generalization_correlation"]["result"]["models"]) == 2
    again = run_sweep(config, tmp_path, engine="inprocess", progress=False, report=False)
    assert sorted(again.skipped) == sorted(outcome.ran) and set(again.failed) == set(outcome.failed)
    ok_ids = [r["id"] for r in ResultStore(tmp_path).records() if r.get("status") == "ok"
              and r["kind"] in ("train", "sweep_model")]
    assert len(ok_ids) == len(set(ok_ids)) == 4  # finished models written once


def test_study_layer_never_imports_the_sweep_layer():
    import ast
    from pathlib import Path

    import ridgeline.study

    offenders = []
    for path in Path(ridgeline.study.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("ridgeline.sweep")]
    assert offenders == []  # sweep → study only


def test_unknown_factory_is_found_before_work(tmp_path):
    raw = sweep_config({"training.lr": [0.05, 0.1]}, measurements=[])
    raw["models"][0]["factory"] = "mlpp"
    with pytest.raises(ConfigError, match="mlpp"):
        run_sweep(config_from_dict(raw), tmp_path / "run", engine="inprocess", progress=False)
    assert not (tmp_path / "run").exists()


def test_garbage_and_stale_temporaries_left_by_a_killed_driver_are_cleared(tmp_path):
    from ridgeline.study import ResultStore

    config = config_from_dict(sweep_config({"training.lr": [0.05]}, seeds=[0], measurements=[]))
    run_sweep(config, tmp_path, engine="inprocess", progress=False, report=False)
    before = {r["id"] for r in ResultStore(tmp_path).records()}
    with open(tmp_path / "results.jsonl", "ab") as handle:
        handle.write(b"\xff\xfe not json\n")
    stale = tmp_path / "checkpoints" / ".m-0.safetensors.abcd1234.tmp"
    stale.write_bytes(b"half a checkpoint")
    outcome = run_sweep(config, tmp_path, engine="inprocess", progress=False, report=False)
    assert outcome.ran == [] and len(outcome.skipped) == 1
    assert {r["id"] for r in ResultStore(tmp_path).records()} == before
    assert not stale.exists()


def test_a_second_driver_on_a_locked_folder_is_refused(tmp_path):
    from ridgeline.errors import RunInUseError
    from ridgeline.study.lock import RunLock

    config = config_from_dict(sweep_config({"training.lr": [0.05]}, seeds=[0], measurements=[]))
    with RunLock(tmp_path):
        with pytest.raises(RunInUseError, match="in use"):
            run_sweep(config, tmp_path, engine="inprocess", progress=False)
    assert not (tmp_path / "results.jsonl").exists()


def test_fingerprints_follow_the_library_defaults_a_measurement_leaves_open(monkeypatch):
    """A measurement whose record depends on a library default (``Options.resume_key``) is
    redone when that default changes, as in a study; without one the fingerprint is as
    before."""
    from ridgeline.study.registry import get_measurement

    def fingerprints():
        return {t.id: t.fingerprint for t in expand_sweep(config_from_dict(sweep_config()))}

    plain = fingerprints()
    options = get_measurement("curvature").options
    monkeypatch.setattr(options, "resume_key", lambda self: {}, raising=False)
    assert fingerprints() == plain
    monkeypatch.setattr(options, "resume_key", lambda self: {"a default": 1}, raising=False)
    first = fingerprints()
    monkeypatch.setattr(options, "resume_key", lambda self: {"a default": 2}, raising=False)
    second = fingerprints()
    assert first.keys() == second.keys() == plain.keys()
    assert all(first[i] != plain[i] and second[i] != first[i] for i in plain)
