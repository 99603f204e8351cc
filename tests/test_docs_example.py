"""docs/adding-a-rule.md runs as written: its python blocks are executed and their tests called."""
import pathlib
import re

import pytest

PAGE = pathlib.Path(__file__).resolve().parent.parent / "docs" / "adding-a-rule.md"
BLOCKS = re.findall(r"```python\n(.*?)```", PAGE.read_text(encoding="utf-8"), flags=re.S)


def page_namespace():
    namespace = {"__name__": "adding_a_rule"}
    for block in BLOCKS:
        exec(compile(block, str(PAGE), "exec"), namespace)
    return namespace


def test_the_page_has_its_example():
    assert BLOCKS, f"no ```python block in {PAGE}"
    lines = [line for line in BLOCKS[0].splitlines() if line.strip()]
    assert len(lines) < 40, f"the example has {len(lines)} non-blank lines; the page promises fewer than 40"
    assert f"That is {len(BLOCKS[0].splitlines())} lines" in PAGE.read_text(encoding="utf-8")


@pytest.mark.parametrize("name", sorted(name for name in page_namespace() if name.startswith("test_")))
def test_the_page_example_passes(name):
    page_namespace()[name]()


def test_the_page_example_catches_a_wrong_psi():
    """The check the page advertises fails when psi is not the gradient of the loss."""
    ns = page_namespace()
    anp = ns["anp"]

    class Wrong(ns["LogCosh"]):
        def psi(self, y, v, delta=None):
            return anp.tanh(2 * (y - v))

    import numpy as np
    with pytest.raises(AssertionError, match="psi"):
        ns["mt"].check_bias(Wrong(), np.array([0.3, -1.0, 2.0]), np.zeros(3))


def test_the_kit_checks_work_without_hypothesis():
    """As the page says: importing mirascore and running a check needs no hypothesis."""
    import subprocess
    import sys
    code = ("import sys; sys.modules['hypothesis'] = None\n"
            "import numpy as np, mirascore as mc, mirascore.testing as mt\n"
            "mt.check_bias(mc.bias.huber(0.5), np.array([0.2, -1.0]), np.zeros(2))\n"
            "try:\n    mt.arrays((2,))\nexcept ImportError:\n    print('strategies need hypothesis')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PAGE.parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "strategies need hypothesis"
