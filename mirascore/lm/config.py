"""Model and training configuration: one frozen record read from a TOML file (docs/training.md).

A config file has two tables, `[model]` and `[train]`, plus an optional `[rule]` table of the
preset's own hyperparameters (e.g. `p = 3`, `q = 4` for Moneta):

    [model]
    model = "moneta"          # "transformer" or any preset of mirascore.presets
    width = 128
    depth = 4
    heads = 4
    [train]
    steps = 600
    lr = 3e-3

Every key is a field of `Config` and belongs to one table; an unknown key, a key in the wrong
table, a value of the wrong type or out of range is a ValueError naming the key and the value.
`load_config(path, **overrides)` applies keyword overrides; `with_overrides(cfg, ["key=value"])`
parses command-line `--set` strings with TOML's value syntax.
"""
import dataclasses
import inspect
import math
import numbers
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import mirascore as mc

TRANSFORMER = "transformer"
MODEL_KEYS = ("model", "vocab", "width", "depth", "heads", "ffn_hidden", "tie_embeddings",
              "norm_eps", "init_std", "dropout", "rope_base", "attention_block", "chunk", "conv",
              "gate_rank", "expansion", "lr_gate_max", "alpha_floor", "rule")
TRAIN_KEYS = ("steps", "batch", "context", "accumulate", "lr", "min_lr_ratio", "warmup",
              "weight_decay", "beta1", "beta2", "adam_eps", "clip", "seed", "dtype", "tf32",
              "log_every", "eval_every", "eval_batches", "checkpoint_every", "task", "mqar_pairs",
              "mqar_power_a")
TASKS = ("lm", "mqar")


@dataclass(frozen=True)
class Config:
    """A model and its training recipe (docs/training.md explains every field)."""
    # [model]
    model: str = "moneta"
    vocab: int = 256             # bytes
    width: int = 128
    depth: int = 4
    heads: int = 4
    ffn_hidden: int = 0          # SwiGLU hidden size; 0: 8/3·width rounded up to a multiple of 16
    tie_embeddings: bool = True  # output projection = embeddingᵀ
    norm_eps: float = 1e-6       # RMSNorm
    init_std: float = 0.02       # normal init of every projection (output projections scaled by 1/sqrt(2·depth))
    dropout: float = 0.0         # training only: dropout on the embedding, mixer and SwiGLU outputs
    rope_base: float = 10000.0   # transformer only
    attention_block: int = 64    # transformer: query/key block of the blockwise attention (not semantic)
    chunk: int = 64              # Miras mixers: chunk size of mc.scan (semantic for anchored rules)
    conv: int = 4                # Miras mixers: causal depthwise conv kernel on q, k, v
    gate_rank: int = 32          # Miras mixers: rank of the low-rank gate projections
    expansion: int = 4           # Miras mixers with an mlp memory: hidden = expansion·head_dim
    lr_gate_max: float = 1.0     # Miras mixers: the inner learning rate is lr_gate_max·sigmoid(·)
    alpha_floor: float = 0.0     # Miras mixers: the retention gate alpha lies in (alpha_floor, 1)
    rule: dict = field(default_factory=dict)   # the preset's own hyperparameters, e.g. {p=3, q=4}
    # [train]
    steps: int = 1000            # optimizer steps; the schedule spans them
    batch: int = 16              # sequences per optimizer step (split into `accumulate` micro-batches)
    context: int = 128           # tokens per sequence (each sequence has context + 1 bytes)
    accumulate: int = 1          # gradient-accumulation micro-batches per step
    lr: float = 3e-3             # peak learning rate
    min_lr_ratio: float = 0.1    # cosine decay ends at lr·min_lr_ratio
    warmup: int = 100            # linear warm-up steps
    weight_decay: float = 0.1    # AdamW decoupled decay (matrices only)
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    clip: float = 1.0            # global gradient-norm clip; 0 disables
    seed: int = 0                # initialisation, data order and dropout masks
    dtype: str = "float32"       # parameters and compute
    tf32: bool = False           # GPU: TF32 tensor-core matmuls
    log_every: int = 10          # steps between metrics lines
    eval_every: int = 200        # steps between validation passes; 0: only at the end
    eval_batches: int = 20       # validation batches of `batch` sequences
    checkpoint_every: int = 0    # steps between checkpoints; 0: only at the end
    task: str = "lm"             # "lm": next-byte prediction on a corpus; "mqar": associative recall (mqar.py)
    mqar_pairs: int = 8          # mqar: key-value pairs per sequence of `context` tokens
    mqar_power_a: float = 0.01   # mqar: Zoology's power law of the query positions (1: uniform)

    @property
    def head_dim(self):
        return self.width // self.heads

    @property
    def ffn(self):
        """The SwiGLU hidden size."""
        return self.ffn_hidden or 16 * math.ceil(8 * self.width / 3 / 16)

    @property
    def is_transformer(self):
        return self.model == TRANSFORMER

    def preset(self):
        """The mc.Rule of a Miras mixer: mc.presets.<model>(head_dim, **rule)."""
        return getattr(mc.presets, self.model)(self.head_dim, **self.rule)

    def to_toml(self):
        """The resolved config as TOML text, in the file's table layout."""
        lines = ["[model]"] + [f"{k} = {_toml_value(getattr(self, k))}" for k in MODEL_KEYS if k != "rule"]
        lines += ["", "[rule]"] + [f"{k} = {_toml_value(v)}" for k, v in self.rule.items()]
        lines += ["", "[train]"] + [f"{k} = {_toml_value(getattr(self, k))}" for k in TRAIN_KEYS]
        return "\n".join(lines) + "\n"


def load_config(path, **overrides):
    """Read a TOML config, apply keyword overrides, validate: a frozen `Config`."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    return from_dict(raw, **overrides)


def from_dict(raw, **overrides):
    """A `Config` from the TOML tables {"model": {...}, "rule": {...}, "train": {...}}."""
    values = {}
    for table, keys in (("model", MODEL_KEYS), ("train", TRAIN_KEYS)):
        section = raw.get(table, {})
        if not isinstance(section, dict):
            raise ValueError(f"[{table}] must be a table, got {section!r}")
        for key, value in section.items():
            if key == "rule":
                raise ValueError("rule hyperparameters go in their own [rule] table")
            if key not in keys:
                home = "model" if key in MODEL_KEYS else "train" if key in TRAIN_KEYS else None
                where = f"; it belongs in [{home}]" if home else ""
                raise ValueError(f"unknown config key {key!r} in [{table}]{where}")
            values[key] = value
    unknown = set(raw) - {"model", "train", "rule"}
    if unknown:
        raise ValueError(f"unknown config table(s) {sorted(unknown)}; expected [model], [rule], [train]")
    rule = raw.get("rule", {})
    if not isinstance(rule, dict):
        raise ValueError(f"[rule] must be a table, got {rule!r}")
    values["rule"] = dict(rule)
    for key, value in overrides.items():
        if key not in MODEL_KEYS + TRAIN_KEYS:
            raise ValueError(f"unknown config key {key!r}")
        values[key] = value
    return validate(Config(**values))


def with_overrides(cfg, assignments):
    """cfg with `key=value` strings applied (values in TOML syntax; bare words are strings);
    `rule.p=2` sets one rule hyperparameter."""
    changes, rule = {}, dict(cfg.rule)
    for text in assignments:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set needs key=value, got {text!r}")
        parsed = _parse_value(key, value.strip())
        if key.startswith("rule."):
            rule[key[len("rule."):]] = parsed
        elif key in MODEL_KEYS + TRAIN_KEYS and key != "rule":
            changes[key] = parsed
        else:
            raise ValueError(f"unknown config key {key!r} in --set {text!r}")
    return validate(dataclasses.replace(cfg, rule=rule, **changes))


def replace(cfg, **changes):
    """A validated copy of cfg with some fields changed."""
    return validate(dataclasses.replace(cfg, **changes))


# ---------------------------------------------------------------- validation

_POSITIVE_INT = ("vocab", "width", "depth", "heads", "attention_block", "chunk", "conv",
                 "gate_rank", "expansion", "steps", "batch", "context", "accumulate",
                 "log_every", "eval_batches", "mqar_pairs")
_NON_NEGATIVE_INT = ("ffn_hidden", "warmup", "seed", "eval_every", "checkpoint_every")
_POSITIVE_REAL = ("norm_eps", "init_std", "rope_base", "lr", "adam_eps", "lr_gate_max", "mqar_power_a")
_DTYPES = ("float32", "float64")


def validate(cfg):
    """cfg itself when every field is of the right type and range; else a ValueError naming it."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in _POSITIVE_INT + _NON_NEGATIVE_INT:
            low = 1 if f.name in _POSITIVE_INT else 0
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
                word = "a positive" if low else "a non-negative"
                raise ValueError(f"config key {f.name!r} must be {word} integer, got {value!r}")
        elif f.type is float:
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise ValueError(f"config key {f.name!r} must be a finite number, got {value!r}")
        elif f.type is bool and not isinstance(value, bool):
            raise ValueError(f"config key {f.name!r} must be true or false, got {value!r}")
    for name in _POSITIVE_REAL:
        if getattr(cfg, name) <= 0:
            raise ValueError(f"config key {name!r} must be > 0, got {getattr(cfg, name)!r}")
    _range("min_lr_ratio", cfg.min_lr_ratio, 0.0, 1.0)
    _range("alpha_floor", cfg.alpha_floor, 0.0, 1.0, high_open=True)
    _range("dropout", cfg.dropout, 0.0, 1.0, high_open=True)     # 1 would drop everything (and ÷ 0)
    _range("beta1", cfg.beta1, 0.0, 1.0, high_open=True)
    _range("beta2", cfg.beta2, 0.0, 1.0, high_open=True)
    if cfg.weight_decay < 0:
        raise ValueError(f"config key 'weight_decay' must be ≥ 0, got {cfg.weight_decay!r}")
    if cfg.clip < 0:
        raise ValueError(f"config key 'clip' must be ≥ 0 (0 disables clipping), got {cfg.clip!r}")
    if cfg.dtype not in _DTYPES:
        raise ValueError(f"config key 'dtype' must be one of {_DTYPES}, got {cfg.dtype!r}")
    if cfg.task not in TASKS:
        raise ValueError(f"config key 'task' must be one of {TASKS}, got {cfg.task!r}")
    if cfg.task == "mqar":
        _check_mqar(cfg)
    if cfg.width % cfg.heads:
        raise ValueError(f"config key 'heads' ({cfg.heads}) must divide 'width' ({cfg.width})")
    if cfg.is_transformer and cfg.head_dim % 2:
        raise ValueError(f"transformer head_dim = width/heads = {cfg.head_dim} must be even (RoPE)")
    if cfg.batch % cfg.accumulate:
        raise ValueError(f"config key 'accumulate' ({cfg.accumulate}) must divide 'batch' ({cfg.batch})")
    if cfg.warmup > cfg.steps:
        raise ValueError(f"config key 'warmup' ({cfg.warmup}) must not exceed 'steps' ({cfg.steps})")
    _check_model(cfg)
    return cfg


def _range(name, value, low, high, high_open=False):
    if value < low or value > high or (high_open and value == high):
        bracket = ")" if high_open else "]"
        raise ValueError(f"config key {name!r} must be in [{low}, {high}{bracket}, got {value!r}")


def _check_mqar(cfg):
    """The MQAR sequences of cfg must exist: pairs and one two-token query slot per key fit into the
    context, and the keys and values (disjoint halves of the vocabulary) are distinct."""
    if 4 * cfg.mqar_pairs > cfg.context:
        raise ValueError(f"config key 'mqar_pairs' ({cfg.mqar_pairs}) needs 'context' ≥ 4·mqar_pairs = "
                         f"{4 * cfg.mqar_pairs}, got {cfg.context}")
    if 2 * cfg.mqar_pairs > cfg.vocab:
        raise ValueError(f"config key 'mqar_pairs' ({cfg.mqar_pairs}) needs 'vocab' ≥ 2·mqar_pairs = "
                         f"{2 * cfg.mqar_pairs}, got {cfg.vocab}")


def _check_model(cfg):
    if cfg.is_transformer:
        if cfg.rule:
            raise ValueError(f"model 'transformer' takes no [rule] hyperparameters, got {cfg.rule}")
        return
    factory = getattr(mc.presets, cfg.model, None)
    if not cfg.model.isidentifier() or cfg.model.startswith("_") or not inspect.isfunction(factory):
        names = ", ".join([TRANSFORMER] + preset_names())
        raise ValueError(f"config key 'model' must be one of {names}; got {cfg.model!r}")
    accepted = list(inspect.signature(factory).parameters)[1:]
    for key in cfg.rule:
        if key not in accepted or key == "d_v":
            raise ValueError(f"[rule] key {key!r} is not a hyperparameter of preset {cfg.model!r} "
                             f"(it takes {', '.join(k for k in accepted if k != 'd_v') or 'none'})")
    rule = cfg.preset()   # the preset validates its own values (ValueError naming them)
    if isinstance(rule.memory, mc.memory.MLP) and cfg.head_dim < 3:
        raise ValueError(f"an mlp memory needs head_dim = width/heads ≥ 3, got {cfg.head_dim}")


def preset_names():
    """The Miras mixers a config can name: the public functions of mirascore.presets."""
    return sorted(n for n, f in vars(mc.presets).items()
                  if inspect.isfunction(f) and not n.startswith("_") and f.__module__ == mc.presets.__name__)


def _parse_value(key, text):
    try:
        return tomllib.loads(f"x = {text}")["x"]
    except tomllib.TOMLDecodeError:
        if text and all(c.isalnum() or c in "_-." for c in text):
            return text                      # a bare word: a string (e.g. model=yaad)
        raise ValueError(f"--set {key}: cannot read value {text!r}") from None


def _toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    return str(v)
