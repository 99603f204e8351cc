"""Language models built from Miras memories, and their trainer (docs/training.md).

    import mirascore.lm as lm
    cfg    = lm.load_config("models/moneta-tiny.toml", chunk=16)   # keywords override fields
    params = lm.init(cfg, seed=0)                                  # dict: dotted name -> array
    logits = lm.forward(params, tokens, cfg)                       # int (B, T) -> (B, T, vocab)
    loss   = lm.loss(params, tokens, cfg)                          # differentiable by mirascore.autodiff
    cache  = lm.init_cache(params, cfg, batch=B)
    logits, cache = lm.prefill(params, prompt, cfg)                # a whole prompt, then decode on
    logits_t, cache = lm.decode_step(params, cache, tokens_t, cfg)
"""
from .config import Config, load_config, with_overrides
from .model import decode_step, forward, init, init_cache, loss, prefill

__all__ = ["Config", "load_config", "with_overrides", "init", "forward", "loss", "init_cache",
           "prefill", "decode_step"]
