"""CuPy kernels for the GPU. Imported lazily: `import mirascore` never imports CuPy."""


def available():
    """True when CuPy imports and sees at least one CUDA device."""
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False
