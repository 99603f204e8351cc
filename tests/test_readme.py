"""The examples in the README and docs/usage.md must run as printed."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _run_blocks(path):
    blocks = re.findall(r"```python\n(.*?)```", path.read_text(), re.S)
    assert blocks, f"{path.name} has no python example"
    namespace = {}
    for code in blocks:                  # the blocks of one page build on each other
        exec(compile(code, str(path), "exec"), namespace)
    return namespace


def test_readme_example_runs(capsys):
    _run_blocks(ROOT / "README.md")
    assert "(2, 64, 16)" in capsys.readouterr().out


def test_usage_examples_run():
    ns = _run_blocks(ROOT / "docs" / "usage.md")
    assert ns["dK"].shape == ns["K"].shape
    assert all(g.shape == p.shape for g, p in zip(ns["dparams"], ns["params"]))
