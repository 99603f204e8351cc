"""Multi-query associative recall (MQAR; Arora et al., "Zoology", 2023), generated and scored.

A sequence of `length` tokens starts with `pairs` key-value pairs k₁ v₁ k₂ v₂ …; every key is
queried once later on, and the model must predict the key's value at the position of its query:

    inputs   k₁ v₁ k₂ v₂ k₃ v₃ | ·  ·  k₂ ·  ·  ·  k₁ ·  k₃ ·  ·  ·
    targets  -  -  -  -  -  -  | -  -  v₂ -  -  -  v₁ -  v₃ -  -  -      (- = IGNORE, not scored)

As Zoology's `multiquery_ar`: keys are distinct, values are distinct, and both come from disjoint
halves of the vocabulary; the query region after the pairs has (length − 2·pairs) // 2 slots at its
even offsets, and the query slots are drawn without replacement with P(slot i) ∝ (i + 1)^(power_a − 1)
(power_a = 0.01: queries crowd the start of the region; 1: uniform), the i-th drawn slot taking the
i-th key; every other query-region token is uniform over the whole vocabulary (Zoology's
random_non_queries). The vocabulary is the model's (`cfg.vocab`, 256 bytes by default): keys are
[0, vocab // 2), values [vocab // 2, vocab). Zoology uses 8,192 tokens (keys [1, 4096)) and notes
that vocabularies above ~1k separate architectures better; with 256 tokens at most 128 pairs fit, and
at 128 pairs every key of the vocabulary occurs in every sequence. `--set vocab=8192` gives
Zoology's vocabulary (a larger embedding).

A batch is one int32 array (batch, 2, length): [:, 0] the inputs, [:, 1] the targets, so the
trainer's batch splitting and device transfer handle it as they handle text. Sequences come from
numpy's default_rng([seed, stream, index]): the trainer's step s uses (seed, TRAIN, s), its
validation (seed, VALIDATION, 0) and `mirascore eval --task mqar` (seed, TEST, 0), so held-out
sequences are never training sequences' streams.
"""
import math

import numpy as np

from mirascore._xp import namespace, to_numpy

from . import model as lm_model
from .layers import cross_entropy

IGNORE = -1
TRAIN, VALIDATION, TEST = 0, 1, 2


def check(batch, pairs, length, vocab, power_a):
    """ValueError naming the first argument that makes MQAR sequences impossible."""
    for name, value in (("batch", batch), ("pairs", pairs), ("length", length), ("vocab", vocab)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"mqar: {name} must be a positive integer, got {value!r}")
    real = isinstance(power_a, (int, float)) and not isinstance(power_a, bool)
    if not (real and math.isfinite(power_a) and power_a > 0):
        raise ValueError(f"mqar: power_a must be a finite number > 0, got {power_a!r}")
    if 4 * pairs > length:
        raise ValueError(f"mqar: pairs = {pairs} need length ≥ 4·pairs = {4 * pairs} (the pairs and "
                         f"one query slot of two tokens per key), got length {length}")
    if 2 * pairs > vocab:
        raise ValueError(f"mqar: pairs = {pairs} distinct keys and values need vocab ≥ {2 * pairs}, "
                         f"got vocab {vocab}")


def slot_probabilities(slots, power_a):
    """Zoology's power law over the query slots: P(i) ∝ (i + 1)^(power_a − 1), i < slots."""
    p = np.arange(1, slots + 1, dtype=np.float64) ** (power_a - 1.0)
    return p / p.sum()


def _distinct(rng, batch, count, choices):
    """(batch, count) distinct draws from range(choices) per row, each row a uniform random subset in
    random order."""
    return np.argsort(rng.random((batch, choices)), axis=1)[:, :count]


def generate(batch, pairs, length, vocab=256, power_a=0.01, seed=0, stream=TRAIN, index=0):
    """int32 (batch, 2, length): MQAR inputs and targets (IGNORE off the query positions); see the
    module docstring. The same (seed, stream, index) gives the same sequences."""
    check(batch, pairs, length, vocab, power_a)
    rng = np.random.default_rng([seed, stream, index])
    half = vocab // 2
    keys = _distinct(rng, batch, pairs, half)
    values = half + _distinct(rng, batch, pairs, vocab - half)
    slots = (length - 2 * pairs) // 2
    # successive sampling without replacement ∝ p (what np.random.choice(replace=False, p=p) does)
    # is the order of the p-weighted Gumbel top-k, so one argsort draws every row at once
    scores = np.log(slot_probabilities(slots, power_a)) + rng.gumbel(size=(batch, slots))
    chosen = np.argsort(-scores, axis=1)[:, :pairs]
    positions = 2 * pairs + 2 * chosen
    inputs = rng.integers(0, vocab, size=(batch, length))
    inputs[:, 0:2 * pairs:2], inputs[:, 1:2 * pairs:2] = keys, values
    rows = np.arange(batch)[:, None]
    inputs[rows, positions] = keys
    targets = np.full((batch, length), IGNORE)
    targets[rows, positions] = values
    return np.stack([inputs, targets], axis=1).astype(np.int32)


def generate_for(cfg, batch, stream, index=0, seed=None):
    """generate() with cfg's sizes: cfg.mqar_pairs pairs in cfg.context tokens of cfg.vocab."""
    return generate(batch, cfg.mqar_pairs, cfg.context, cfg.vocab, cfg.mqar_power_a,
                    cfg.seed if seed is None else seed, stream, index)


def _query_positions(targets, pairs):
    """(B, pairs) positions of each row's targets in increasing order, on the targets' device without
    a host round trip (a boolean index would need one): sort (ignored·T + position)."""
    xp = namespace(targets)
    T = targets.shape[1]
    order = xp.where(targets == IGNORE, T, 0) + xp.arange(T)
    return xp.sort(order, axis=1)[:, :pairs]


def _split(batch, cfg):
    """(inputs, targets, positions) of a packed batch; on the host, checks it holds cfg's task."""
    if batch.ndim != 3 or batch.shape[1] != 2:
        raise ValueError(f"an MQAR batch must have shape (B, 2, T), got {tuple(batch.shape)}")
    inputs, targets = batch[:, 0], batch[:, 1]
    if isinstance(batch, np.ndarray):
        counts = (targets != IGNORE).sum(axis=1)
        if np.any(counts != cfg.mqar_pairs):
            raise ValueError(f"an MQAR batch for mqar_pairs = {cfg.mqar_pairs} has rows with "
                             f"{sorted(set(counts.tolist()))} targets")
    return inputs, targets, _query_positions(targets, cfg.mqar_pairs)


def _picked(params, batch, cfg, dropout_seed=None):
    """(logits at the query positions (B, pairs, vocab), their target values (B, pairs))."""
    inputs, targets, positions = _split(batch, cfg)
    xp = namespace(targets)
    logits = lm_model.forward(params, inputs, cfg, dropout_seed)
    rows = xp.arange(targets.shape[0])[:, None]
    return logits[rows, positions], xp.take_along_axis(targets, positions, axis=1)


def loss(params, batch, cfg, dropout_seed=None):
    """Mean cross-entropy (nats) of the values at the query positions only; differentiable by ad.grad
    (the trainer's loss for task = "mqar"). dropout_seed as lm.forward's (None: no dropout)."""
    logits, values = _picked(params, batch, cfg, dropout_seed)
    return cross_entropy(logits, values)


def evaluate(params, cfg, batches):
    """{"acc", "loss", "queries"}: the fraction of queries whose value is the argmax of the logits (as
    Zoology's accuracy, over queries), the mean query cross-entropy (nats), the number of queries.
    Batches run in pieces of at most batch / accumulate sequences, as in training (memory)."""
    xp = namespace(*params.values())
    rows = cfg.batch // cfg.accumulate
    correct, nats, queries = 0, 0.0, 0
    for batch in batches:
        for start in range(0, len(batch), rows):
            logits, values = _picked(params, xp.asarray(batch[start:start + rows]), cfg)
            correct += int(to_numpy((logits.argmax(axis=-1) == values).sum()))
            nats += float(cross_entropy(logits, values)) * values.size
            queries += values.size
    return {"acc": correct / queries, "loss": nats / queries, "queries": queries}


def held_out(cfg, samples, seed=0):
    """The held-out sets of `mirascore eval --task mqar`: `samples` sequences from the TEST stream, in
    batches of cfg.batch (the last one shorter)."""
    sizes = [min(cfg.batch, samples - start) for start in range(0, samples, cfg.batch)]
    return [generate_for(cfg, size, TEST, i, seed) for i, size in enumerate(sizes)]
