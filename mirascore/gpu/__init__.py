"""The GPU side, imported lazily: `import mirascore` never imports CuPy.

    settings            every GPU setting (GEMM precision, CUDA graphs, cache sizes) and resource, one place
    blas                capture-safe cuBLAS matrix products in fp32, tf32, bf16 or fp16 (the matmul of
                        mirascore's CuPy namespace)
    graph               CUDA graph replay of the anchored scan's chunk loops
    fused               fused kernels registered for the specs' @fusable formulas
    delta_rule_kernels  the delta rule's chunk pieces as CUDA kernels (delta_rule_kernels.cu: the state
                        loop, the inverse; delta_chunk_kernels.cu: the fused TF32 per-chunk forward)
"""


def available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
