"""Language models built from Miras memories, and their trainer (DESIGN §7, docs/training.md).

    import mirascore.lm as lm
    cfg    = lm.load_config("models/moneta-tiny.toml", chunk=16)
"""
from .config import Config, load_config, with_overrides

__all__ = ["Config", "load_config", "with_overrides"]
