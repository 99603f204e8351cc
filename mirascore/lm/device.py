"""Where the trainer's arrays live: numpy on the CPU, CuPy on the GPU (`--device cpu|gpu`)."""
import contextlib

import numpy as np

DEVICES = ("cpu", "gpu")


def array_module(device):
    """numpy for "cpu", cupy for "gpu" (a ValueError when CuPy or a GPU is missing)."""
    if device == "cpu":
        return np
    if device != "gpu":
        raise ValueError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    try:
        import cupy
    except ImportError:
        raise ValueError("--device gpu needs CuPy: pip install 'mirascore[cuda12]' (or [cuda13])") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:     # CUDA driver missing or broken: CuPy raises its own error types
        raise ValueError(f"--device gpu: CUDA is not usable here ({e})") from None
    if count == 0:
        raise ValueError("--device gpu: no CUDA device found")
    return cupy


@contextlib.contextmanager
def tf32(enabled):
    """Within the block, float32 matrix products on the GPU may use TF32 tensor cores (docs/contract.md §5):
    mirascore's GEMM precision setting (mirascore.gpu.settings, used by the scans and by autodiff's
    matmul on CuPy) and the math mode of CuPy's handle (the CUPY_TF32 variable alone does not reach
    batched strided calls). Both are restored on exit, the setting whole (a bf16 setting stays bf16).
    enabled=False does nothing."""
    if not enabled:
        yield
        return
    import cupy
    from cupy_backends.cuda.libs import cublas

    from mirascore.gpu import settings
    handle = cupy.cuda.device.get_cublas_handle()
    cupy_mode = cublas.getMathMode(handle)
    with settings.using(precision="tf32"):
        cublas.setMathMode(handle, getattr(cublas, "CUBLAS_TF32_TENSOR_OP_MATH", 3))
        try:
            yield
        finally:
            cublas.setMathMode(handle, cupy_mode)


def describe(xp):
    """A short name of the device, for run.json: "cpu" or the GPU's name."""
    if xp is np:
        return "cpu"
    props = xp.cuda.runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"]
    return f"gpu: {name.decode() if isinstance(name, bytes) else name}"


def to_device(tree, xp):
    """A dict of host arrays moved to xp's device (a no-op for numpy)."""
    return {name: xp.asarray(a) for name, a in tree.items()}
