"""The command line (mirascore.lm.cli): train, sample, eval, plot, and one-line errors."""
import json
import subprocess
import sys

import pytest

from mirascore.lm import cli, config, rundir

TINY_TOML = """\
[model]
model = "moneta"
width = 16
depth = 1
heads = 2
chunk = 8

[train]
steps = 4
batch = 4
context = 16
warmup = 1
log_every = 2
eval_batches = 2
"""


def write_config(folder, text=TINY_TOML, name="tiny.toml"):
    path = folder / name
    path.write_text(text)
    return path


def run_cli(capsys, *argv):
    """(status, stdout, stderr) of one in-process command."""
    status = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 4-step run of the tiny config on the embedded corpus."""
    folder = tmp_path_factory.mktemp("cli")
    out = folder / "run"
    assert cli.main(["train", str(write_config(folder)), "--out", str(out), "--quiet"]) == 0
    return out


def test_train_prints_progress_summary_and_a_sample(tmp_path, capsys):
    status, out, err = run_cli(capsys, "train", write_config(tmp_path), "--out", tmp_path / "run", "--quiet")
    assert status == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("step 2/4 | loss ") and "tokens/s" in lines[0]
    assert any(line.startswith("step 4/4") and "val bpb" in line for line in lines)
    summary = next(line for line in lines if line.startswith("done: "))
    assert "4 steps" in summary and "256 tokens" in summary and "final val bpb" in summary
    assert "ROMEO:" in out.split(summary)[1]
    assert len(rundir.read_metrics(tmp_path / "run")) == 2


def test_train_flags_and_set_land_in_the_resolved_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    status, _, err = run_cli(capsys, "train", write_config(tmp_path), "--steps", "3", "--seed", "5",
                             "--eval-every", "2", "--checkpoint-every", "1", "--quiet",
                             "--set", "lr=0.01", "rule.p=2", "--set", "log_every=1")
    assert status == 0, err
    cfg = config.load_config(tmp_path / "runs" / "tiny" / "config.toml")      # --out defaults to runs/<stem>
    assert (cfg.steps, cfg.seed, cfg.eval_every, cfg.checkpoint_every, cfg.lr, cfg.log_every) == (3, 5, 2, 1, 0.01, 1)
    assert cfg.rule == {"p": 2}


def test_resume_continues_and_a_finished_run_just_reports(tmp_path, capsys):
    path = write_config(tmp_path)
    out = tmp_path / "run"
    assert run_cli(capsys, "train", path, "--out", out, "--quiet")[0] == 0
    status, stdout, _ = run_cli(capsys, "train", path, "--out", out, "--quiet", "--resume")
    assert status == 0 and "done: 4 steps" in stdout


def test_train_with_a_data_file_prints_no_sample(tmp_path, capsys):
    data = tmp_path / "corpus.txt"
    data.write_bytes(b"to be or not to be " * 200)
    status, out, err = run_cli(capsys, "train", write_config(tmp_path), "--out", tmp_path / "run",
                               "--data", data, "--quiet")
    assert status == 0, err
    assert "final val bpb" in out and "ROMEO:" not in out


@pytest.fixture
def args_for(tmp_path, trained):
    """Bad command lines, by name."""
    good = write_config(tmp_path)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "x").write_text("x")
    return {
        "unknown --set key": (["train", good, "--set", "widht=3"], "widht"),
        "bad --set value": (["train", good, "--set", "heads=3"], "heads"),
        "--set without =": (["train", good, "--set", "lr"], "key=value"),
        "missing config": (["train", tmp_path / "none.toml"], "does not exist"),
        "unknown key in file": (["train", write_config(tmp_path, TINY_TOML + "colour = 1\n", "bad.toml")], "colour"),
        "invalid TOML": (["train", write_config(tmp_path, "[model\n", "broken.toml")], "not valid TOML"),
        "bad --steps": (["train", good, "--steps", "0"], "--steps"),
        "bad --device": (["train", good, "--device", "tpu"], "--device"),
        "missing --data": (["train", good, "--out", tmp_path / "o1", "--data", tmp_path / "none.txt"], "none.txt"),
        "occupied --out": (["train", good, "--out", occupied], "--resume"),
        "--resume without a run": (["train", good, "--out", tmp_path / "o2", "--resume"], "does not exist"),
        "--resume with another config": (["train", good, "--out", trained, "--resume", "--steps", "9"], "steps (4 in the run, 9 now)"),
        "sample without a run": (["sample", tmp_path / "none", "--prompt", "x"], "not a run directory"),
        "sample with an empty prompt": (["sample", trained, "--prompt", ""], "prompt"),
        "sample without --prompt": (["sample", trained], "--prompt"),
        "eval with a bad task": (["eval", trained, "--task", "mmlu"], "--task"),
        "lambada without --data": (["eval", trained, "--task", "lambada"], "--data"),
        "niah with a bad --lengths": (["eval", trained, "--task", "niah", "--lengths", "1k"], "--lengths"),
        "niah with a wrong folder": (["eval", trained, "--task", "niah", "--data", tmp_path], "PaulGrahamEssays.json"),
        "plot without metrics": (["plot", tmp_path / "none"], "metrics.jsonl"),
        "no command": ([], "required"),
        "unknown command": (["fly"], "invalid choice"),
    }


BAD = ["unknown --set key", "bad --set value", "--set without =", "missing config", "unknown key in file",
       "invalid TOML", "bad --steps", "bad --device", "missing --data", "occupied --out", "--resume without a run",
       "--resume with another config", "sample without a run", "sample with an empty prompt",
       "sample without --prompt", "eval with a bad task", "lambada without --data", "niah with a bad --lengths",
       "niah with a wrong folder", "plot without metrics", "no command", "unknown command"]


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_line_and_status_2(case, args_for, capsys):
    argv, needle = args_for[case]
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("mirascore: error: ") and needle in err, err
    assert "Traceback" not in err


def test_python_dash_m_reports_errors_without_a_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mirascore", "train", str(tmp_path / "none.toml")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [f"mirascore: error: config file '{tmp_path / 'none.toml'}' does not exist"]


def test_a_missing_train_extra_is_named(tmp_path, capsys, monkeypatch):
    for name in ("tqdm", "tqdm.auto"):                            # as if tqdm were not installed
        monkeypatch.setitem(sys.modules, name, None)
    status, _, err = run_cli(capsys, "train", write_config(tmp_path), "--out", tmp_path / "run")
    assert status == 2 and err == "mirascore: error: tqdm is not installed: pip install 'mirascore[train]'\n"
    assert not (tmp_path / "run").exists()                           # so a retry can start afresh


def test_sample_is_the_prompt_and_a_reproducible_continuation(trained, capsys):
    status, greedy, _ = run_cli(capsys, "sample", trained, "--prompt", "ROMEO:", "--tokens", "20", "--temperature", "0")
    assert status == 0 and greedy.startswith("ROMEO:")
    assert run_cli(capsys, "sample", trained, "--prompt", "ROMEO:", "--tokens", "20", "--temperature", "0")[1] == greedy
    seeded = run_cli(capsys, "sample", trained, "--prompt", "A", "--tokens", "30", "--seed", "3")[1]
    assert seeded == run_cli(capsys, "sample", trained, "--prompt", "A", "--tokens", "30", "--seed", "3")[1]


def test_eval_bpb_text_and_json(trained, capsys):
    status, out, _ = run_cli(capsys, "eval", trained, "--task", "bpb", "--max-bytes", "2000")
    assert status == 0 and out.startswith("bpb ") and "1,999 bytes" in out and "validation" in out
    status, out, _ = run_cli(capsys, "eval", trained, "--task", "bpb", "--max-bytes", "2000", "--json")
    report = json.loads(out)
    assert report["task"] == "bpb" and report["bytes"] == 1999 and report["step"] == 4 and 4 < report["bpb"] < 9


def test_eval_bpb_on_a_data_folder_split(trained, tmp_path, capsys):
    (tmp_path / "train.txt").write_bytes(b"x" * 100)
    (tmp_path / "validation.txt").write_bytes(b"v" * 300)
    (tmp_path / "test.txt").write_bytes(b"t" * 200)
    report = json.loads(run_cli(capsys, "eval", trained, "--task", "bpb", "--data", tmp_path, "--split", "test", "--json")[1])
    assert report["bytes"] == 199 and "test" in report["data"]


def test_eval_bpb_of_a_whole_file_and_split_errors(trained, tmp_path, capsys):
    """A single file: --split validation is its last 10 % (as training splits it), --split all
    every byte; a folder has no "all", a file no "test": one-line errors, not a silent default."""
    text = tmp_path / "wiki.raw"
    text.write_bytes(b"w" * 1000)
    whole = json.loads(run_cli(capsys, "eval", trained, "--task", "bpb", "--data", text, "--split", "all", "--json")[1])
    assert whole["bytes"] == 999 and "all of it" in whole["data"]
    tail = json.loads(run_cli(capsys, "eval", trained, "--task", "bpb", "--data", text, "--json")[1])
    assert tail["bytes"] == 99
    status, _, err = run_cli(capsys, "eval", trained, "--task", "bpb", "--data", text, "--split", "test")
    assert status != 0 and "--split test" in err and len(err.strip().splitlines()) == 1
    status, _, err = run_cli(capsys, "eval", trained, "--task", "bpb", "--data", tmp_path, "--split", "all")
    assert status != 0 and "--split all" in err and len(err.strip().splitlines()) == 1


def test_eval_niah_reports_ruler_scores_and_the_answers_bits_per_byte(trained, tmp_path, capsys):
    from test_lm_evaluate import write_niah_assets
    argv = ["eval", trained, "--task", "niah", "--data", write_niah_assets(tmp_path), "--lengths", "1000",
            "--samples", "1"]
    report = json.loads(run_cli(capsys, *argv, "--json")[1])
    tasks = {"niah_single_1", "niah_single_2", "niah_single_3"}
    assert set(report["scores"]) == set(report["answer_bpb"]) == tasks and report["samples"] == 1
    assert all(0 < by_length["1000"] < 20 for by_length in report["answer_bpb"].values())
    status, out, _ = run_cli(capsys, *argv)
    assert status == 0 and out.splitlines()[0].startswith("niah_single_1 1000:") and "bpb)" in out


def test_plot_writes_a_png_of_several_runs(trained, tmp_path, capsys):
    status, out, _ = run_cli(capsys, "plot", trained, trained, "--out", tmp_path / "both.png")
    assert status == 0 and out.strip().endswith("both.png")
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert run_cli(capsys, "plot", trained)[0] == 0 and (trained / "curves.png").is_file()


@pytest.mark.gpu
def test_train_and_sample_on_the_gpu(tmp_path, capsys):
    status, out, err = run_cli(capsys, "train", write_config(tmp_path), "--out", tmp_path / "run", "--device", "gpu", "--quiet")
    assert status == 0, err
    status, out, _ = run_cli(capsys, "sample", tmp_path / "run", "--prompt", "ROMEO:", "--tokens", "10", "--device", "gpu")
    assert status == 0 and out.startswith("ROMEO:")
