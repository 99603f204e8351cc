"""Every GPU setting of mirascore, and the process-wide GPU resources built from them, in one place.

    from mirascore.gpu import settings
    settings.current()                          # Settings(precision='fp32', cuda_graphs=True, ...)
    previous = settings.configure(precision="tf32")   # change some; returns the previous Settings
    with settings.using(cuda_graphs=False):     # changed inside the block only
        ...

Settings (a frozen record; change it only through `configure` / `using`):
  precision             how mirascore.gpu.blas multiplies float32 matrices (float64 ones always run in
                        float64, the judge), one of PRECISIONS (docs/contract.md §5):
                          "fp32"  float32 SIMT GEMMs, no reduced precision (the default);
                          "tf32"  TF32 tensor cores: operands rounded to 10 mantissa bits in the GEMM;
                          "bf16"  operands cast to bfloat16 (8 exponent, 7 mantissa bits, round to
                                  nearest even), tensor cores with fp32 accumulation and fp32 output;
                          "fp16"  the same with float16 (5 exponent, 10 mantissa bits): TF32's
                                  rounding, but operands beyond ±65504 overflow to inf and below
                                  6.1e-5 lose bits (subnormals).
                        Everything outside the GEMMs (states, decays, gates, elementwise work) stays
                        float32. `mc.scan(precision=...)` sets it for one scan and its backward.
  tf32                  the setting before `precision` existed, kept as an alias: tf32=True is
                        precision="tf32", tf32=False is precision="fp32"; `current().tf32` is
                        `current().precision == "tf32"`.
  cuda_graphs           replay the anchored scan's chunk loops as CUDA graphs (mirascore.gpu.graph).
                        Default on; MIRASCORE_CUDA_GRAPHS=0 in the environment turns it off.
  max_graphs            how many recorded graphs are kept, least recently used first out; each holds
                        a memory pool about the size of its eager call's peak. Default 8.
  blas_workspace_bytes  the cuBLAS workspace of each handle and of each recorded graph (32 MiB, cuBLAS's
                        recommendation for Hopper); read when a handle or graph is made.

Resources (`RESOURCES`, never part of any result): the cuBLAS handles, one per (device, stream),
each with its workspace; the stream per device that every capture records on; the kept graphs.
Nothing here imports CuPy until a GPU call needs it.
"""
import contextlib
import os
from collections import OrderedDict
from typing import NamedTuple

from ..validation import choice, flag, size

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


class Settings(NamedTuple):
    precision: str = "fp32"
    cuda_graphs: bool = os.environ.get("MIRASCORE_CUDA_GRAPHS", "1") != "0"
    max_graphs: int = 8
    blas_workspace_bytes: int = 32 << 20

    @property
    def tf32(self):
        """The alias of the old switch: True when float32 GEMMs run on TF32 tensor cores."""
        return self.precision == "tf32"


class Resources:
    """Process-wide GPU state built from the settings."""

    def __init__(self):
        self.blas_handles = {}            # (device, stream pointer) -> (handle, workspace)
        self.capture_streams = {}         # device -> the stream captures record on
        self.graphs = OrderedDict()       # signature -> graph (or a marker), most recent last


RESOURCES = Resources()
_current = Settings()


def current():
    """The settings in force."""
    return _current


def precision(value):
    """`value` if it names a GEMM precision (PRECISIONS), else a ValueError naming it."""
    return choice("precision", value, PRECISIONS)


def configure(**changes):
    """Change some settings (keywords: the fields of Settings, or tf32, the alias of precision);
    returns the previous Settings. A ValueError names an unknown setting or a bad value."""
    global _current
    changes = dict(changes)
    if "tf32" in changes:
        if "precision" in changes:
            raise ValueError(f"give precision= or its alias tf32=, not both; got precision="
                             f"{changes['precision']!r} and tf32={changes['tf32']!r}")
        changes["precision"] = "tf32" if flag("tf32", changes.pop("tf32")) else "fp32"
    for name, value in changes.items():
        if name not in Settings._fields:
            raise ValueError(f"unknown GPU setting {name!r}; the settings are "
                             f"{', '.join(Settings._fields)} (and tf32, an alias of precision)")
        if name == "precision":
            precision(value)
        elif name == "cuda_graphs":
            flag(name, value)
        else:
            size(name, value)
    previous, _current = _current, _current._replace(**changes)
    if _current.max_graphs < previous.max_graphs:
        from . import graph
        graph.trim()
    return previous


@contextlib.contextmanager
def using(**changes):
    """`configure(**changes)` for the duration of a with-block."""
    previous = configure(**changes)
    try:
        yield current()
    finally:
        configure(**previous._asdict())
