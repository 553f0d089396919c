"""``consumed``: the samples of each step over all ranks, a re-run step's last record winning per rank."""

import json

from tread_scale.trainer.callbacks.sample_ledger import consumed


def test_last_record_per_rank_and_step(tmp_path):
    def write(name, recs):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))

    # rank 0 re-ran step 2 after a resume with other samples; rank 1 did not get that far before the kill
    write("rank0.jsonl", [{"step": 1, "ids": [4, 0]}, {"step": 2, "ids": [9, 9]}, {"step": 2, "ids": [2, 6]}])
    write("rank1.jsonl", [{"step": 1, "ids": [5, 1]}, {"step": 2, "ids": [7, 3]}])
    assert consumed(tmp_path) == {1: [0, 1, 4, 5], 2: [2, 3, 6, 7]}
