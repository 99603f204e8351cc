"""The training loop (mirascore.lm.train): metrics, checkpoints, bit-exact resume, refusals."""
import json
import tomllib

import numpy as np
import pytest

from mirascore.lm import checkpoint, config, rundir, train


def tiny(model="moneta", **train_keys):
    """A tiny real model: width 16, depth 1, 2 heads, context 16 (chunk 8 for the Miras mixers)."""
    table = {"steps": 6, "batch": 4, "context": 16, "warmup": 2, "log_every": 1, "eval_every": 0,
             "eval_batches": 2, "checkpoint_every": 0, "lr": 3e-3}
    table.update(train_keys)
    return config.from_dict({"model": {"model": model, "width": 16, "depth": 1, "heads": 2, "chunk": 8},
                             "train": table})


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in train.TIMING_FIELDS} for row in rows]


@pytest.mark.parametrize("model", ["moneta", "transformer"])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tmp_path, model):
    # accumulate = 2 and a log window (4 steps) that straddles the checkpoint at step 3
    cfg = tiny(model, steps=6, accumulate=2, log_every=4, eval_every=2, checkpoint_every=3)
    whole = train.run(cfg, tmp_path / "whole")
    first = train.run(cfg, tmp_path / "parts", stop_at=3)
    assert first.step == 3 and checkpoint.load(tmp_path / "parts")[2]["step"] == 3
    rest = train.run(cfg, tmp_path / "parts", resume=True)
    assert rest.step == 6
    for name in whole.params:
        assert np.array_equal(whole.params[name], rest.params[name]), name
        assert np.array_equal(whole.opt.v[name], rest.opt.v[name]), name
    assert without_timing(rundir.read_metrics(tmp_path / "whole")) == without_timing(rundir.read_metrics(tmp_path / "parts"))
    assert [r["loss"] for r in first.metrics + rest.metrics] == [r["loss"] for r in whole.metrics]


def test_resume_drops_the_metrics_after_the_checkpoint(tmp_path):
    cfg = tiny(steps=4, checkpoint_every=2)
    train.run(cfg, tmp_path, stop_at=3)          # the checkpoint is at step 3, the last one written
    with open(tmp_path / rundir.METRICS, "a") as f:
        f.write('{"step": 4, "loss": 0.0}\n{"step": 5, "lo')      # a line after it, and one cut short
    train.run(cfg, tmp_path, resume=True)
    assert [r["step"] for r in rundir.read_metrics(tmp_path)] == [1, 2, 3, 4]


def test_metrics_run_info_and_checkpoint_state(tmp_path):
    cfg = tiny(steps=4, log_every=2, eval_every=3)
    result = train.run(cfg, tmp_path)
    rows = rundir.read_metrics(tmp_path)
    assert [r["step"] for r in rows] == [2, 3, 4]                      # log steps, eval steps, the end
    assert [("val_bpb" in r) for r in rows] == [False, True, True]
    for row in rows:
        assert {"step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(row)
        assert row["tokens"] == row["step"] * cfg.batch * cfg.context
    assert result.val_bpb == rows[-1]["val_bpb"] and 4 < result.val_bpb < 9
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["parameters"] > 0 and info["flops_per_token"] > 0 and info["device"] == "cpu"
    assert info["data"] == "tinyshakespeare (embedded)" and info["config"]["steps"] == 4
    assert config.load_config(tmp_path / "config.toml") == cfg
    assert tomllib.loads((tmp_path / "config.toml").read_text())["train"]["steps"] == 4
    state = json.loads((tmp_path / "checkpoint" / "state.json").read_text())
    assert state["step"] == 4 and state["tokens"] == 4 * cfg.batch * cfg.context and state["seed"] == cfg.seed
    assert state["data"]["next_step"] == 4 and state["config_hash"] == train.config_hash(cfg)


def test_training_lowers_the_loss(tmp_path):
    cfg = tiny("gated_deltanet", steps=25, lr=1e-2, warmup=3, log_every=5, batch=8)
    rows = train.run(cfg, tmp_path).metrics
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5


def test_gradient_accumulation_averages_micro_batches(tmp_path):
    one = train.run(tiny(steps=2, accumulate=1), tmp_path / "one")
    two = train.run(tiny(steps=2, accumulate=2), tmp_path / "two")
    np.testing.assert_allclose([r["loss"] for r in two.metrics], [r["loss"] for r in one.metrics], rtol=1e-5)
    for name in one.params:
        np.testing.assert_allclose(two.params[name], one.params[name], rtol=1e-4, atol=1e-6)


def test_steps_keyword_sets_the_schedule_length(tmp_path):
    result = train.run(tiny(steps=50), tmp_path, steps=3)
    assert result.step == 3 and config.load_config(tmp_path / "config.toml").steps == 3
    assert result.metrics[-1]["lr"] == pytest.approx(3e-3 * 0.1)


def test_a_non_empty_out_dir_is_refused_without_resume(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="--resume"):
        train.run(tiny(), tmp_path)


def test_resume_refusals_name_the_problem(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train.run(tiny(), tmp_path / "none", resume=True)
    train.run(tiny(steps=2), tmp_path / "run", stop_at=1)
    with pytest.raises(ValueError, match=r"steps \(2 in the run, 3 now\).*lr"):
        train.run(tiny(steps=3, lr=1e-3), tmp_path / "run", resume=True)
    other = tmp_path / "other.txt"
    other.write_bytes(b"abc" * 1000)
    with pytest.raises(ValueError, match="trained on"):
        train.run(tiny(steps=2), tmp_path / "run", data_path=other, resume=True)
    rundir.create(tmp_path / "fresh", tiny(steps=2), {"data": "tinyshakespeare (embedded)"})
    with pytest.raises(ValueError, match="no checkpoint"):
        train.run(tiny(steps=2), tmp_path / "fresh", resume=True)


def test_resuming_a_finished_run_changes_nothing(tmp_path):
    cfg = tiny(steps=2)
    done = train.run(cfg, tmp_path)
    again = train.run(cfg, tmp_path, resume=True)
    assert again.step == 2 and again.metrics == [] and again.val_bpb == done.val_bpb
    assert all(np.array_equal(done.params[n], again.params[n]) for n in done.params)


def test_text_file_data(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_bytes(b"abcd" * 500)
    result = train.run(tiny(steps=3), tmp_path / "run", data_path=path)
    assert json.loads((tmp_path / "run" / "run.json").read_text())["data"] == str(path.resolve())
    assert result.val_bpb is not None


@pytest.mark.gpu
def test_gpu_run_trains_checkpoints_and_resumes_bit_exactly(tmp_path):
    import cupy
    cfg = tiny(steps=5, accumulate=2, log_every=2, eval_every=2, checkpoint_every=2)
    whole = train.run(cfg, tmp_path / "whole", device_name="gpu")
    assert isinstance(whole.params["embed.weight"], cupy.ndarray)
    train.run(cfg, tmp_path / "parts", device_name="gpu", stop_at=3)
    rest = train.run(cfg, tmp_path / "parts", device_name="gpu", resume=True)
    for name in whole.params:
        assert cupy.array_equal(whole.params[name], rest.params[name]), name
    assert without_timing(rundir.read_metrics(tmp_path / "whole")) == without_timing(rundir.read_metrics(tmp_path / "parts"))
    cpu = train.run(cfg, tmp_path / "cpu")
    np.testing.assert_allclose([r["loss"] for r in whole.metrics], [r["loss"] for r in cpu.metrics], rtol=1e-3)
    assert json.loads((tmp_path / "whole" / "run.json").read_text())["device"].startswith("gpu")


@pytest.mark.gpu
def test_gpu_tf32_run_trains(tmp_path):
    cfg = tiny("transformer", steps=3, log_every=1)
    plain = train.run(cfg, tmp_path / "fp32", device_name="gpu")
    tf32 = train.run(config.replace(cfg, tf32=True), tmp_path / "tf32", device_name="gpu")
    np.testing.assert_allclose([r["loss"] for r in tf32.metrics], [r["loss"] for r in plain.metrics], rtol=1e-2)
