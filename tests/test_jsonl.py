"""The one JSON-lines reader: the last record of each step wins."""

import json

import pytest

from tread_scale.jsonl import last_record_per_step


def test_last_record_of_each_step_wins_in_step_order(tmp_path):
    path = tmp_path / "m.jsonl"
    recs = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 3, "loss": 1.5},
            {"step": 2, "loss": 2.5}, {"step": 3, "loss": 1.0}]  # a resume from step 1 re-logged 2 and 3
    path.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert last_record_per_step(path) == [recs[0], recs[3], recs[4]]


def test_key_filter_keeps_records_of_another_kind_from_replacing(tmp_path):
    path = tmp_path / "eval.jsonl"
    recs = [{"step": 2, "fid": 9.0}, {"step": 2, "val_loss": 0.3}, {"step": 4, "fid": 7.0}]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert last_record_per_step(path, "fid") == [recs[0], recs[2]]
    assert last_record_per_step(path, "val_loss") == [recs[1]]


def test_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        last_record_per_step(tmp_path / "none.jsonl")
