"""What a training task gives the trainer (cfg.task): its data, its loss and its validation metrics.

- "lm": next-byte prediction on a corpus (data.py, model.loss); validation reports `val_bpb`.
- "mqar": generated multi-query associative recall (mqar.py, mqar.loss); validation reports
  `val_bpb` (the query cross-entropy in bits per query) and `val_acc` (query accuracy).

The training loop (train.py) is the same for both; only these four functions look at cfg.task.
"""
import numpy as np

from . import data, mqar
from . import model as lm_model
from .evaluate import bits_per_byte, mean_loss


def corpus(cfg, data_path):
    """The task's data.Corpus: the text at data_path (None: the embedded one), or for mqar an empty
    one whose `source` names the generator (run.json's "data"; --resume compares it)."""
    if cfg.task == "lm":
        return data.load_corpus(data_path)
    if data_path is not None:
        raise ValueError(f"--data {str(data_path)!r} does not apply to task {cfg.task!r} (its sequences "
                         f"are generated)")
    empty = np.zeros(0, dtype=np.uint8)
    return data.Corpus(empty, empty, f"mqar (generated: {cfg.mqar_pairs} pairs, power_a {cfg.mqar_power_a})",
                       "validation sequences from the generator's own stream")


def loss_fn(cfg):
    """The differentiable loss(params, batch, cfg, dropout_seed=None) of the task."""
    return mqar.loss if cfg.task == "mqar" else lm_model.loss


def train_batch(cfg, corpus, step):
    """The host int batch of optimizer step `step`: a pure function of (cfg, step)."""
    if cfg.task == "mqar":
        return mqar.generate_for(cfg, cfg.batch, mqar.TRAIN, step)
    return data.train_batch(corpus.train, step, cfg.seed, cfg.batch, cfg.context)


def validation_batches(cfg, corpus):
    """The fixed validation set: cfg.eval_batches batches of cfg.batch sequences."""
    if cfg.task == "mqar":
        return [mqar.generate_for(cfg, cfg.batch, mqar.VALIDATION, i) for i in range(cfg.eval_batches)]
    return data.validation_batches(corpus.validation, cfg.seed, cfg.eval_batches, cfg.batch, cfg.context)


def validation_metrics(params, cfg, batches):
    """The metrics of one validation pass, as metrics-row fields."""
    if cfg.task == "mqar":
        scores = mqar.evaluate(params, cfg, batches)
        return {"val_bpb": bits_per_byte(scores["loss"]), "val_acc": scores["acc"]}
    return {"val_bpb": bits_per_byte(mean_loss(params, cfg, batches))}
