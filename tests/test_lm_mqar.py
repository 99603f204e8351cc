"""Multi-query associative recall (mirascore.lm.mqar): the generator, the masked loss, training on it
through the trainer (task = "mqar"), `mirascore eval --task mqar` and benchmarks/mqar.py."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

import mirascore.autodiff as ad
from mirascore.lm import cli, config, model, mqar, rundir, train

ROOT = Path(__file__).resolve().parent.parent


def tiny(name="transformer", **train_keys):
    table = {"task": "mqar", "mqar_pairs": 4, "batch": 4, "context": 16, "steps": 4, "warmup": 1,
             "log_every": 2, "eval_batches": 1}
    table.update(train_keys)
    return config.from_dict({"model": {"model": name, "width": 16, "depth": 2, "heads": 2, "chunk": 8,
                                       "vocab": 32}, "train": table})


# ------------------------------------------------------------------ the generator

def test_pairs_come_first_and_each_query_targets_its_keys_value():
    pairs, length, vocab = 6, 40, 64
    batch = mqar.generate(50, pairs, length, vocab, seed=3)
    assert batch.shape == (50, 2, length) and batch.dtype == np.int32
    for inputs, targets in batch:
        keys, values = inputs[0:2 * pairs:2], inputs[1:2 * pairs:2]
        assert len(set(keys)) == pairs and len(set(values)) == pairs
        assert keys.max() < vocab // 2 <= values.min() and inputs.min() >= 0 and inputs.max() < vocab
        positions = np.flatnonzero(targets != mqar.IGNORE)
        assert len(positions) == pairs                          # targets exactly at the query positions
        assert positions.min() >= 2 * pairs and np.all((positions - 2 * pairs) % 2 == 0)
        assert sorted(inputs[positions]) == sorted(keys)         # every key queried once
        value_of = dict(zip(keys, values))
        assert all(targets[t] == value_of[inputs[t]] for t in positions)


def test_same_seed_same_sequences_other_streams_differ():
    a = mqar.generate(8, 4, 32, seed=1, stream=mqar.TRAIN, index=5)
    assert np.array_equal(a, mqar.generate(8, 4, 32, seed=1, stream=mqar.TRAIN, index=5))
    for other in ({"seed": 2, "stream": mqar.TRAIN, "index": 5}, {"seed": 1, "stream": mqar.TEST, "index": 5},
                  {"seed": 1, "stream": mqar.TRAIN, "index": 6}):
        assert not np.array_equal(a, mqar.generate(8, 4, 32, **other))


@pytest.mark.parametrize("power_a", [0.01, 0.5, 1.0])
def test_first_key_query_slot_follows_zoologys_power_law(power_a):
    """The first key takes the first slot of a successive draw without replacement ∝ p: P(slot i) = p_i."""
    pairs, length = 3, 22                                       # 8 query slots
    batch = mqar.generate(20000, pairs, length, power_a=power_a, seed=0)
    first_key = batch[:, 0, 0]
    slots = [(np.flatnonzero((row[1] != mqar.IGNORE) & (row[0] == k))[0] - 2 * pairs) // 2
             for row, k in zip(batch, first_key)]
    frequency = np.bincount(slots, minlength=8) / len(slots)
    assert np.allclose(frequency, mqar.slot_probabilities(8, power_a), atol=0.015)


@pytest.mark.parametrize("kwargs, name", [
    ({"batch": 0}, "batch"), ({"pairs": 0}, "pairs"), ({"length": 15}, "length ≥ 4·pairs = 16"),
    ({"vocab": 7}, "vocab ≥ 8"), ({"power_a": 0.0}, "power_a"), ({"pairs": True}, "pairs"),
    ({"power_a": float("nan")}, "power_a")])
def test_impossible_sequences_are_value_errors_naming_the_argument(kwargs, name):
    args = {"batch": 2, "pairs": 4, "length": 16, "vocab": 32, "power_a": 0.01} | kwargs
    with pytest.raises(ValueError, match=name):
        mqar.generate(**args)


@pytest.mark.parametrize("keys, needle", [
    ({"task": "recall"}, "'task'"), ({"mqar_pairs": 5}, "'context' ≥ 4·mqar_pairs = 20"),
    ({"mqar_pairs": 0}, "'mqar_pairs'"), ({"mqar_power_a": -1.0}, "'mqar_power_a'")])
def test_config_refuses_bad_task_keys(keys, needle):
    with pytest.raises(ValueError, match=needle):
        tiny(**keys)
    with pytest.raises(ValueError, match="'vocab' ≥ 2·mqar_pairs = 64"):
        config.replace(tiny(), mqar_pairs=32, context=128)


# ------------------------------------------------------------------ loss and accuracy

@pytest.mark.parametrize("name", ["transformer", "moneta"])
def test_loss_is_the_cross_entropy_at_the_query_positions_only(name):
    cfg = config.replace(tiny(name), dtype="float64")
    params = model.init(cfg, seed=1)
    batch = mqar.generate_for(cfg, 3, mqar.TRAIN)
    logits = np.asarray(model.forward(params, batch[:, 0], cfg))
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    rows, cols = np.nonzero(batch[:, 1] != mqar.IGNORE)
    targets = batch[rows, 1, cols]
    assert float(mqar.loss(params, batch, cfg)) == pytest.approx(-log_p[rows, cols, targets].mean(), rel=1e-12)
    scores = mqar.evaluate(params, cfg, [batch[:2], batch[2:]])
    assert scores["queries"] == 12 and scores["loss"] == pytest.approx(-log_p[rows, cols, targets].mean())
    assert scores["acc"] == np.mean(log_p[rows, cols].argmax(-1) == targets)
    loss, grads = ad.value_and_grad(mqar.loss)(params, batch, cfg)
    assert set(grads) == set(params) and np.abs(grads["embed.weight"]).sum() > 0


def test_a_batch_of_another_pair_count_is_refused():
    with pytest.raises(ValueError, match="mqar_pairs = 4"):
        mqar.loss(model.init(tiny()), mqar.generate(2, 3, 16, 32), tiny())


# ------------------------------------------------------------------ training

def test_a_tiny_transformer_learns_small_mqar_above_chance(tmp_path):
    """4 pairs of a 16-token vocabulary: chance is 1/8 for a model that has learnt which tokens are
    values; 150 steps (~4 s) reach ~0.3 for every seed tried."""
    cfg = config.from_dict({"model": {"model": "transformer", "width": 32, "depth": 2, "heads": 2, "vocab": 16},
                            "train": {"task": "mqar", "mqar_pairs": 4, "context": 16, "batch": 32, "steps": 150,
                                      "warmup": 10, "lr": 0.01, "eval_every": 0, "eval_batches": 1}})
    result = train.run(cfg, tmp_path / "run")
    assert result.metrics[-1]["loss"] < np.log(8)
    assert mqar.evaluate(result.params, cfg, mqar.held_out(cfg, 128))["acc"] > 0.2


def test_mqar_runs_resume_bit_for_bit(tmp_path):
    cfg = tiny("gated_deltanet", log_every=1)
    whole = train.run(cfg, tmp_path / "whole")
    train.run(cfg, tmp_path / "cut", stop_at=2)
    resumed = train.run(cfg, tmp_path / "cut", resume=True)
    assert all(np.array_equal(whole.params[n], resumed.params[n]) for n in whole.params)
    strip = [{k: v for k, v in r.items() if k not in train.TIMING_FIELDS} for r in rundir.read_metrics(tmp_path / "whole")]
    assert strip == [{k: v for k, v in r.items() if k not in train.TIMING_FIELDS}
                     for r in rundir.read_metrics(tmp_path / "cut")]
    assert "val_acc" in strip[-1] and "val_bpb" in strip[-1]
    assert rundir.read_info(tmp_path / "whole")["data"].startswith("mqar (generated")


def test_mqar_takes_no_data(tmp_path):
    with pytest.raises(ValueError, match="does not apply to task 'mqar'"):
        train.run(tiny(), tmp_path / "run", data_path=tmp_path / "x.txt")


# ------------------------------------------------------------------ command line

MQAR_TOML = """\
[model]
model = "gated_deltanet"
vocab = 32
width = 16
depth = 2
heads = 2
chunk = 8

[train]
task = "mqar"
mqar_pairs = 4
steps = 4
batch = 4
context = 16
warmup = 1
log_every = 2
eval_batches = 1
"""


def test_train_and_eval_task_mqar_on_the_command_line(tmp_path, capsys):
    (tmp_path / "mqar.toml").write_text(MQAR_TOML)
    out = tmp_path / "run"
    assert cli.main(["train", str(tmp_path / "mqar.toml"), "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "val acc" in printed and "ROMEO:" not in printed
    assert cli.main(["eval", str(out), "--task", "mqar", "--samples", "10", "--seed", "3"]) == 0
    line = capsys.readouterr().out
    assert line.startswith("mqar: acc ") and "40 queries" in line and "10 sequences of 16 tokens, 4 pairs" in line
    assert cli.main(["eval", str(out), "--task", "mqar", "--samples", "10", "--seed", "3", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["task"] == "mqar" and report["step"] == 4 and report["queries"] == 40
    assert (report["pairs"], report["context"], report["vocab"], report["seed"]) == (4, 16, 32, 3)
    assert 0 <= report["acc"] <= 1 and f"{report['acc']:.4f}" in line
    assert cli.main(["eval", str(out), "--task", "mqar", "--data", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "mirascore: error: eval --task mqar takes no --data: its sequences are generated\n"


# ------------------------------------------------------------------ the accuracy table

def test_benchmark_script_prints_the_table_and_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("mqar_benchmark", ROOT / "benchmarks" / "mqar.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main(["--quick", "--models", "transformer,gated_deltanet", "--pairs", "2,4", "--contexts", "16,16",
                        "--steps", "2", "--samples", "4", "--json", str(tmp_path / "t.json")]) == 0
    out = capsys.readouterr().out
    assert "| model | params | 2 pairs, T=16 | 4 pairs, T=16 |" in out and "| gated_deltanet |" in out
    rows = json.loads((tmp_path / "t.json").read_text())["rows"]
    assert [(r["model"], r["pairs"]) for r in rows] == [("transformer", 2), ("gated_deltanet", 2),
                                                        ("transformer", 4), ("gated_deltanet", 4)]
    assert all(0 <= r["acc"] <= 1 and r["steps"] == 2 and r["batch"] == 16 for r in rows)
    cfg = script.row_config("moneta", 64, 512, script.FULL)
    assert (cfg.depth, cfg.width, cfg.context, cfg.mqar_pairs, cfg.batch) == (2, 128, 512, 64, 64)
    assert cfg.alpha_floor == 1 - 1 / 512 and cfg.task == "mqar"
