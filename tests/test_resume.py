"""What a rerun picks up from a killed run's directory: complete checkpoints only, metrics up to them."""

import json

from rl.common.resume import checkpoint_name, latest_complete_checkpoint, truncate_metrics


def make(root, name, *files):
    d = root / name
    d.mkdir(parents=True)
    for f in files:
        (d / f).write_text("x")
    return d


def test_latest_complete_checkpoint_skips_partial_and_temporary_directories(tmp_path):
    assert latest_complete_checkpoint(tmp_path / "missing", "step", "state.pt") is None
    assert latest_complete_checkpoint(tmp_path, "step", "state.pt") is None
    make(tmp_path, "step-2", "model", "state.pt")
    want = make(tmp_path, checkpoint_name("step", 10), "model", "state.pt")  # numeric, not lexicographic: 10 > 9 > 2
    make(tmp_path, "step-9", "model", "state.pt")
    make(tmp_path, "step-11", "model")                      # killed before its last file
    make(tmp_path, "step-12.tmp", "model", "state.pt")      # killed between the last write and the rename
    make(tmp_path, "step-x", "state.pt")
    make(tmp_path, "other-13", "state.pt")
    (tmp_path / "step-14").write_text("a file, not a directory")
    assert latest_complete_checkpoint(tmp_path, "step", "state.pt") == want
    assert latest_complete_checkpoint(tmp_path, "other", "state.pt") == tmp_path / "other-13"


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint_and_drops_a_half_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert truncate_metrics(path, 3) == 0 and not path.exists()
    records = [{"phase": "rl", "step": s, "loss": s / 10} for s in (1, 2, 3, 4, 5)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n" + '{"phase": "rl", "step": 6, "lo')
    assert truncate_metrics(path, 3) == 3  # steps 4 and 5, and the half line
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == records[:3]
    before = path.read_text()
    assert truncate_metrics(path, 3) == 0 and path.read_text() == before
    assert truncate_metrics(path, 0) == 3 and path.read_text() == ""
