"""What the benchmarks share: the CPU model they print; the GPU ones' matmul ceilings and TF32 switch."""
import platform
from pathlib import Path


# matmul ceilings measured on the H200 (../shared/anchors/README.md): fp32 cuBLAS, batched fp32
# 64×128×64, bf16 tensor cores; FLOP/s
CEIL = {"fp32": 51e12, "fp32_batched": 25e12, "bf16": 745e12}


def cpu_model():
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def enable_tf32():
    """TF32 tensor cores for float32 GEMMs: mirascore's own cuBLAS handles (mirascore.gpu.blas, which
    the scans use) and CuPy's (CUPY_TF32 alone does not reach batched strided calls; the handle's
    math mode does). Returns CuPy's handle's math mode."""
    import cupy
    from cupy_backends.cuda.libs import cublas

    from mirascore.gpu import blas
    blas.set_tf32(True)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setMathMode(handle, getattr(cublas, "CUBLAS_TF32_TENSOR_OP_MATH", 3))
    return cublas.getMathMode(handle)
