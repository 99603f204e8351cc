"""Every GPU setting of mirascore, and the process-wide GPU resources built from them, in one place.

    from mirascore.gpu import settings
    settings.current()                          # Settings(tf32=False, cuda_graphs=True, max_graphs=8, ...)
    previous = settings.configure(tf32=True)    # change some; returns the previous Settings
    with settings.using(cuda_graphs=False):     # changed inside the block only
        ...

Settings (a frozen record; change it only through `configure` / `using`):
  tf32                  float32 GEMMs of mirascore.gpu.blas on TF32 tensor cores (relative error about
                        1e-3 per product; docs/contract.md §5 allows ≤ 1e-2 against float64). Default off.
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

from ..validation import flag, size


class Settings(NamedTuple):
    tf32: bool = False
    cuda_graphs: bool = os.environ.get("MIRASCORE_CUDA_GRAPHS", "1") != "0"
    max_graphs: int = 8
    blas_workspace_bytes: int = 32 << 20


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


def configure(**changes):
    """Change some settings (keywords: the fields of Settings); returns the previous Settings.
    A ValueError names an unknown setting or a bad value."""
    global _current
    for name, value in changes.items():
        if name not in Settings._fields:
            raise ValueError(f"unknown GPU setting {name!r}; the settings are {', '.join(Settings._fields)}")
        if name in ("tf32", "cuda_graphs"):
            flag(name, value)
        else:
            size(name, value)
    previous, _current = _current, _current._replace(**changes)
    if _current.tf32 != previous.tf32 and RESOURCES.blas_handles:
        from . import blas
        blas.apply_math_mode()
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
