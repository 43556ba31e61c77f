"""Resume: lost or replaced checkpoints are retrained and what used them redone; unreadable
bytes in results.jsonl are skipped, reported and moved out; a last line without its newline
counts once; temporary files of a killed run are removed; the report shows the settings
each record was computed with."""

from __future__ import annotations

import json
import shutil

import pytest
from study_helpers import CALLS, tiny

from ridgeline.study import ResultStore, config_from_dict, run_study
from ridgeline.study.context import checkpoint_digest
from ridgeline.study.report import render_report


def _ids(run) -> list[str]:
    return [r["id"] for r in ResultStore(run).records()]


def test_deleted_checkpoints_are_retrained_and_the_study_completes(tmp_path):
    run_study(config_from_dict(tiny()), tmp_path, progress=False)
    before = ResultStore(tmp_path).latest()
    shutil.rmtree(tmp_path / "checkpoints")
    grown = tiny()  # a measurement still to do needs the lost checkpoints
    grown["measurements"].append({"kind": "weights_sum", "id": "uses-both",
                                  "models": ["a", "b"], "label": "both"})
    CALLS.clear()
    outcome = run_study(config_from_dict(grown), tmp_path, progress=False)
    assert outcome.ran == ["train:a", "train:b", "uses-both"] and CALLS == ["both"]
    # Training is seeded, so the retrained checkpoints are byte-identical to the lost ones:
    # the records computed from them still hold and are not redone.
    assert checkpoint_digest(tmp_path / "checkpoints" / "a.safetensors") == \
        before["uses-a"]["checkpoints"]["a"] == before["train:a"]["checkpoint_sha256"]
    assert outcome.skipped == ["uses-a", "uses-b"]


def test_a_replaced_checkpoint_is_retrained(tmp_path):
    config = config_from_dict(tiny())
    run_study(config, tmp_path, progress=False)
    checkpoints = tmp_path / "checkpoints"
    shutil.copy(checkpoints / "b.safetensors", checkpoints / "a.safetensors")  # e.g. another run
    CALLS.clear()
    outcome = run_study(config, tmp_path, progress=False)
    assert outcome.ran == ["train:a"]
    latest = ResultStore(tmp_path).latest()
    assert checkpoint_digest(checkpoints / "a.safetensors") == latest["uses-a"]["checkpoints"]["a"]


def test_a_record_computed_from_another_checkpoint_is_redone(tmp_path):
    """As when another run had replaced the checkpoint while this record was computed."""
    config = config_from_dict(tiny())
    run_study(config, tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    foreign = checkpoint_digest(tmp_path / "checkpoints" / "b.safetensors")
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for record in records:
        if record["id"] == "uses-a":
            record["checkpoints"]["a"] = foreign
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    CALLS.clear()
    outcome = run_study(config, tmp_path, progress=False)
    assert outcome.ran == ["uses-a"] and CALLS == ["a"]


def test_records_without_checkpoint_digests_are_redone_when_their_model_is_retrained(tmp_path):
    """Runs written before records tracked checkpoints: their options name the models."""
    config = config_from_dict(tiny())
    run_study(config, tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    old = []
    for line in path.read_text().splitlines():
        record = json.loads(line)
        record.pop("checkpoints", None), record.pop("checkpoint_sha256", None)
        old.append(json.dumps(record))
    path.write_text("\n".join(old) + "\n")
    (tmp_path / "checkpoints" / "b.safetensors").write_bytes(b"not a checkpoint")
    outcome = run_study(config, tmp_path, progress=False)
    assert outcome.ran == ["train:b", "uses-b"]


def test_garbage_appended_to_results_is_skipped_reported_and_moved_out(tmp_path):
    config = config_from_dict(tiny())
    run_study(config, tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    good = path.read_bytes()
    garbage = bytes(range(256)) * 2 + b"\xff\xfe\x80 half {\"id\": "  # newlines inside, no end
    path.write_bytes(good + garbage)
    store = ResultStore(tmp_path)
    assert _ids(tmp_path) == ["study", "train:a", "train:b", "uses-a", "uses-b"]
    assert store.records() and store.unreadable == 3  # the garbage holds two "\n" bytes
    assert "3 unreadable line(s) of results.jsonl were skipped" in render_report(tmp_path)
    with pytest.warns(UserWarning, match="3 unreadable line"):
        outcome = run_study(config, tmp_path, progress=False)
    assert outcome.ran == []
    assert path.read_bytes() == good  # a clean JSON Lines file again
    moved = (tmp_path / "results.unreadable").read_bytes()
    assert moved.startswith(b"# 3 unreadable lines") and moved.endswith(garbage + b"\n")
    for line in path.read_text(encoding="utf-8").splitlines():
        json.loads(line)


def test_a_last_line_missing_only_its_newline_counts_once(tmp_path):
    config = config_from_dict(tiny())
    run_study(config, tmp_path, progress=False)
    path = tmp_path / "results.jsonl"
    path.write_bytes(path.read_bytes()[:-1])
    assert _ids(tmp_path)[-1] == "uses-b"
    CALLS.clear()
    outcome = run_study(config, tmp_path, progress=False)
    assert outcome.ran == [] and CALLS == []
    ids = _ids(tmp_path)
    assert len(ids) == len(set(ids))
    config2 = config_from_dict(tiny(measurements=[{"kind": "weights_sum", "label": "new"}]))
    run_study(config2, tmp_path, progress=False)  # the next append ends the line first
    assert [r["id"] for r in ResultStore(tmp_path).records()].count("uses-b") == 1


def test_temporary_files_of_a_killed_run_are_removed(tmp_path):
    config = config_from_dict(tiny())
    (tmp_path / "checkpoints").mkdir()
    left = [tmp_path / ".report.html.k3x9a_0q.tmp", tmp_path / ".config.toml.abcdefgh.tmp",
            tmp_path / "checkpoints" / ".a.safetensors.zz1_9k2m.tmp"]
    for path in left:
        path.write_bytes(b"")  # what a kill between mkstemp and the write leaves
    keep = [tmp_path / "notes.tmp", tmp_path / ".notes.txt.abcdefgh.tmp"]  # not ours
    for path in keep:
        path.write_text("keep me")
    run_study(config, tmp_path, progress=False)
    assert not any(path.exists() for path in left) and all(path.exists() for path in keep)
    assert not list(tmp_path.glob("checkpoints/.*.tmp"))


def test_a_failed_atomic_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from ridgeline.study import store

    def failing_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(store.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        store.atomic_write_text(tmp_path / "report.html", "<html></html>")
    assert list(tmp_path.iterdir()) == []


def test_report_shows_the_settings_each_record_was_computed_with(tmp_path):
    run_study(config_from_dict(tiny()), tmp_path, progress=False)
    edited = tiny(measurements=[{"kind": "weights_sum", "id": "uses-a", "label": "a"}])
    edited["training"] = {"epochs": 2, "batch_size": 32}
    outcome = run_study(config_from_dict(edited), tmp_path, progress=False)
    assert outcome.ran == ["train:a", "train:b", "uses-a"]  # uses-b is no longer planned
    latest = ResultStore(tmp_path).latest()
    assert latest["uses-a"]["settings"]["training"]["epochs"] == 2
    assert latest["uses-b"]["settings"]["training"]["epochs"] == 1
    html = render_report(tmp_path)
    config_section = html[html.index('id="config"'):]
    assert "epochs = 2" in config_section and "epochs = 1\n" not in config_section
    assert "uses-b" in config_section and "training.epochs = 1 (now 2)" in config_section
    studies = [r for r in ResultStore(tmp_path).records() if r["kind"] == "study"]
    assert len(studies) == 2  # one per configuration the run folder has seen
