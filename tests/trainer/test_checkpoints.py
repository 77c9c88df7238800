"""Pure unit tests of the checkpoint picker and the metrics gauges (torch-free, no marker)."""

from __future__ import annotations

import json
import os
import stat

import finetune_contract as c
from finetune_trainer import checkpoints as ck
from finetune_trainer.metrics import TrainerMetrics


def _ckpt(root, step, state=True, sentinel=False):
    d = root / f"checkpoint-{step}"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes(b"x")
    if state:
        (d / ck.TRAINER_STATE_NAME).write_text("{}")
    if sentinel:
        (d / ck.INCOMPLETE_SENTINEL).write_text("")
    return d


def test_picks_highest_complete_and_reports_incomplete(tmp_path):
    _ckpt(tmp_path, 5)
    _ckpt(tmp_path, 40)
    _ckpt(tmp_path, 100)  # numeric, not lexical, order
    _ckpt(tmp_path, 120, state=False)  # half-written: no trainer_state.json
    _ckpt(tmp_path, 110, sentinel=True)  # JIT sentinel
    (tmp_path / "checkpoint-999").write_text("a file, not a dir")
    (tmp_path / "checkpoint-abc").mkdir()
    (tmp_path / "incomplete-checkpoint-130").mkdir()
    s = ck.scan(str(tmp_path))
    assert s.latest == ck.Checkpoint(str(tmp_path / "checkpoint-100"), 100)
    assert [x.step for x in s.incomplete] == [110, 120]
    assert ck.latest_complete_checkpoint(str(tmp_path)).step == 100


def test_empty_and_missing_directories(tmp_path):
    assert ck.latest_complete_checkpoint(str(tmp_path)) is None
    assert ck.latest_complete_checkpoint(str(tmp_path / "nope")) is None
    _ckpt(tmp_path, 3, state=False)
    s = ck.scan(str(tmp_path))
    assert s.latest is None and [x.step for x in s.incomplete] == [3]


def test_quarantine_moves_out_of_the_checkpoint_glob(tmp_path):
    _ckpt(tmp_path, 7)
    bad = ck.Checkpoint(str(_ckpt(tmp_path, 9, state=False)), 9)
    (tmp_path / "incomplete-checkpoint-9").mkdir()  # an older quarantined copy is replaced
    moved = ck.quarantine(bad)
    assert os.path.basename(moved) == "incomplete-checkpoint-9"
    assert not (tmp_path / "checkpoint-9").exists()
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*")) == ["checkpoint-7"]
    assert ck.scan(str(tmp_path)).incomplete == ()


def test_choose_start_sets_incomplete_aside_then_falls_back_to_resume_from(tmp_path):
    run, given = tmp_path / "run", tmp_path / "given"
    run.mkdir()
    given.mkdir()
    _ckpt(run, 4, state=False)
    (given / ck.TRAINER_STATE_NAME).write_text('{"global_step": 30}')
    assert ck.choose_start(str(run)) == (None, ["checkpoint-4"])
    assert (run / "incomplete-checkpoint-4").is_dir()
    assert ck.choose_start(str(run), str(given)) == (ck.Checkpoint(str(given), 30), [])
    _ckpt(run, 6)  # the run's own checkpoint wins over resume-from
    assert ck.choose_start(str(run), str(given)) == (ck.Checkpoint(str(run / "checkpoint-6"), 6), [])
    assert ck.choose_start(str(tmp_path / "new")) == (None, []) and (tmp_path / "new").is_dir()


def test_already_complete_reads_the_trainer_state(tmp_path):
    d = _ckpt(tmp_path, 10)
    state = {"global_step": 10, "max_steps": 10, "log_history": [{"loss": 2.5}, {"loss": 1.5}, {"lr": 0.1}]}
    (d / ck.TRAINER_STATE_NAME).write_text(json.dumps(state))
    point = ck.Checkpoint(str(d), 10)
    assert ck.already_complete(point, None) == (10, 1.5)  # epoch mode: the total recorded in the checkpoint
    assert ck.already_complete(point, 10) == (10, 1.5)
    assert ck.already_complete(point, 20) == (None, None)
    (d / ck.TRAINER_STATE_NAME).write_text("not json")
    assert ck.already_complete(point, 10) == (None, None)


def test_publish_adapter_copies_adapter_and_tokenizer_only(tmp_path):
    d = _ckpt(tmp_path, 5)
    for name in ("adapter_config.json", "tokenizer.json", "optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (d / name).write_text(name)
    os.chmod(d / "adapter_model.safetensors", 0o600)
    out = tmp_path / "out"
    ck.publish_adapter(str(d), str(out))
    published = sorted(p.name for p in out.iterdir())
    assert published == ["adapter_config.json", "adapter_model.safetensors", "tokenizer.json"]
    assert stat.S_IMODE((out / "adapter_model.safetensors").stat().st_mode) == 0o644


def test_checkpoint_step():
    assert ck.checkpoint_step("checkpoint-12") == 12
    assert ck.checkpoint_step("/a/b/checkpoint-12/") == 12
    assert ck.checkpoint_step("checkpoint-12.tmp") is None
    assert ck.checkpoint_step("incomplete-checkpoint-12") is None


def test_make_world_readable(tmp_path):
    d = tmp_path / "checkpoint-1"
    d.mkdir()
    f = d / "adapter_model.safetensors"
    f.write_bytes(b"x")
    os.chmod(f, 0o600)
    other = d / "optimizer.pt"
    other.write_bytes(b"x")
    os.chmod(other, 0o600)
    assert ck.make_world_readable(str(tmp_path)) == 1
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE(other.stat().st_mode) == 0o600
    assert ck.make_world_readable(str(tmp_path)) == 0


def test_metrics_heartbeat_moves_only_with_steps(tmp_path):
    m = TrainerMetrics()
    try:
        port = m.serve(0, "127.0.0.1", port_file_dir=str(tmp_path))
        assert int((tmp_path / c.METRICS_PORT_FILE).read_text()) == port > 0
        assert m.heartbeat._value.get() == 0  # nothing before the first step
        m.on_step(1, 0.1)
        hb = m.heartbeat._value.get()
        assert hb > 0
        m.on_step(1, 0.1)  # same step again: no heartbeat
        assert m.heartbeat._value.get() == hb
        m.on_step(2, 0.2)
        assert m.heartbeat._value.get() >= hb
        assert m.step._value.get() == 2
    finally:
        m.close()


def test_metrics_endpoint_serves_contract_names(tmp_path):
    import urllib.request

    m = TrainerMetrics()
    try:
        port = m.serve(0, "127.0.0.1")
        m.on_step(3, 0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            text = r.read().decode()
    finally:
        m.close()
    for name in c.METRIC_NAMES:
        assert f"\n{name} " in text, name
    assert "python_gc" not in text  # own registry, not the default one
