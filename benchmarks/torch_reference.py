"""PyTorch references for benchmarks/train_step.py: the Transformer++ and the Gated DeltaNet language
models of mirascore.lm, written as a PyTorch user would write them, with the same layout and
exactly the same parameters (so the same count, and `load_params` copies ours in):

    embedding → depth × [x += mixer(RMSNorm(x)); x += SwiGLU(RMSNorm(x))] → RMSNorm → tied head

With cfg.dropout > 0, nn.Dropout acts where mirascore's dropout does (the embedding, each mixer
and SwiGLU output) while the module is in training mode; its masks are torch's, not ours.

- Transformer++ mixer: fused q/k/v projection, half-split RoPE on q and k,
  `F.scaled_dot_product_attention(is_causal=True)`, output projection; no biases.
- Gated DeltaNet mixer (mirascore's Miras layer with `mc.presets.gated_deltanet`): fused q/k/v
  projection, causal depthwise conv (kernel cfg.conv) + SiLU, per-head gates from a low-rank
  projection (β = lr_gate_max·sigmoid, log α = −softplus), FLA's `chunk_gated_delta_rule` with q, k
  ℓ2-normalised in the kernel (eps 1e-6, as ours) and scale 1 (ours reads W q unscaled), then
  RMSNorm(y) ⊙ SiLU(x W_g) and W_o.

The step (`make_step`): forward, cross-entropy, backward, global-norm clip (cfg.clip),
`torch.optim.AdamW(fused=True)` with weight decay on the matrices only (as mirascore's AdamW), in
fp32, TF32 or bf16 autocast (fp32 master weights).
"""
import contextlib
import importlib

import torch
import torch.nn as nn
import torch.nn.functional as F

PRECISIONS = ("fp32", "tf32", "bf16")


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


class SwiGLU(nn.Module):
    def __init__(self, width, hidden):
        super().__init__()
        self.gate_up = nn.Linear(width, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, width, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


def rope_tables(T, d, base, device):
    """cos, sin (T, d/2) of positions·base^(−2i/d), computed in float64 as ours."""
    inv_freq = 1.0 / base ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
    angles = torch.arange(T, dtype=torch.float64, device=device)[:, None] * inv_freq
    return angles.cos(), angles.sin()          # cast to q's dtype in rope


def rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.heads, self.base = cfg.heads, cfg.rope_base
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width, bias=False)
        self.out = nn.Linear(cfg.width, cfg.width, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        cos, sin = rope_tables(T, C // self.heads, self.base, x.device)
        y = F.scaled_dot_product_attention(rope(q, cos, sin), rope(k, cos, sin), v, is_causal=True)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


def fla_gated_delta_rule():
    """FLA's chunk_gated_delta_rule as mixer(q, k, v, g, beta) -> o, all (B, T, H, ·), and a note.

    fla-core ≥ 0.5 refuses the gated backward on Hopper with Triton < 3.7.1 (fla-org/
    flash-linear-attention#640: wrong gradients reported for BK = 64); torch 2.11 pins Triton 3.6.
    The guard is bypassed here, as in ../shared/anchors/anchors_gpu.py: the kernels' work, hence
    their time, is the same; their gradients at BK = 64 may not be."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    chunk_o = importlib.import_module("fla.ops.common.chunk_o")
    note = ""
    if getattr(chunk_o, "IS_NVIDIA_HOPPER", False) and not getattr(chunk_o, "TRITON_ABOVE_3_7_1", True):
        chunk_o.TRITON_ABOVE_3_7_1 = True
        note = "FLA's Hopper/Triton<3.7.1 backward guard (#640) bypassed for timing"

    def mixer(q, k, v, g, beta):
        o, _ = chunk_gated_delta_rule(q, k, v, g, beta, scale=1.0, use_qk_l2norm_in_kernel=True)
        return o
    return mixer, note


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg, mixer):
        super().__init__()
        C, H = cfg.width, cfg.heads
        self.heads, self.lr_max, self.mixer = H, cfg.lr_gate_max, mixer
        self.qkv = nn.Linear(C, 3 * C, bias=False)
        self.conv = nn.Conv1d(3 * C, 3 * C, cfg.conv, groups=3 * C, padding=cfg.conv - 1, bias=False)
        self.gates_down = nn.Linear(C, cfg.gate_rank, bias=False)
        self.gates_up = nn.Linear(cfg.gate_rank, 2 * H, bias=True)      # [lr | alpha] per head
        self.out_norm = RMSNorm(C // H, cfg.norm_eps)
        self.out_gate = nn.Linear(C, C, bias=False)
        self.out = nn.Linear(C, C, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        H = self.heads
        h = F.silu(self.conv(self.qkv(x).transpose(1, 2))[..., :T]).transpose(1, 2)
        q, k, v = h.reshape(B, T, 3, H, C // H).unbind(2)               # (B, T, H, D) each
        gates = self.gates_up(self.gates_down(x))
        gates = gates.float() if gates.dtype in (torch.bfloat16, torch.float16) else gates   # FLA: fp32 gates
        beta = self.lr_max * torch.sigmoid(gates[..., :H])
        log_alpha = -F.softplus(gates[..., H:])
        y = self.mixer(q, k, v, log_alpha, beta)
        y = self.out_norm(y).reshape(B, T, C)
        return self.out(y * F.silu(self.out_gate(x)))


def dropout(cfg):
    """nn.Dropout(cfg.dropout), or the identity without dropout (no mask work, the old graph)."""
    return nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()


class Block(nn.Module):
    def __init__(self, cfg, mixer):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.mixer = Attention(cfg) if cfg.is_transformer else GatedDeltaNet(cfg, mixer)
        self.ffn_norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.ffn = SwiGLU(cfg.width, cfg.ffn)
        self.drop = dropout(cfg)

    def forward(self, x):
        x = x + self.drop(self.mixer(self.mixer_norm(x)))
        return x + self.drop(self.ffn(self.ffn_norm(x)))


class LM(nn.Module):
    """The language model of a mirascore.lm config whose model is "transformer" or
    "gated_deltanet"; `mixer` replaces FLA's kernel (e.g. a naive recurrence on the CPU)."""

    def __init__(self, cfg, mixer=None):
        super().__init__()
        if cfg.model not in ("transformer", "gated_deltanet"):
            raise ValueError(f"no PyTorch reference for model {cfg.model!r}")
        self.note = ""
        if not cfg.is_transformer and mixer is None:
            mixer, self.note = fla_gated_delta_rule()
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.drop = dropout(cfg)
        self.blocks = nn.ModuleList(Block(cfg, mixer) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cfg.norm_eps)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.width, cfg.vocab, bias=False)

    def forward(self, tokens):
        x = self.drop(self.embed(tokens))
        for block in self.blocks:
            x = block(x)
        x = self.norm(x)
        return F.linear(x, self.embed.weight) if self.head is None else self.head(x)

    def loss(self, tokens):
        """Mean next-token cross-entropy of int tokens (B, T + 1), as mirascore.lm.loss."""
        logits = self(tokens[:, :-1])
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def load_params(model, params, cfg):
    """Copy mirascore's params dict (numpy arrays, names of mirascore.lm.model.param_specs) into
    model; every parameter of the model is written once."""
    def t(name):
        return torch.as_tensor(params[name])

    def lin(*names):               # ours x @ W (n_in, n_out); nn.Linear's weight is Wᵀ
        return torch.cat([t(n).T for n in names], dim=0)

    new = {"embed.weight": t("embed.weight"), "norm.weight": t("norm.gain")}
    if not cfg.tie_embeddings:
        new["head.weight"] = lin("head.weight")
    for i in range(cfg.depth):
        ours, mine = f"blocks.{i}.", f"blocks.{i}."
        m = ours + "mixer."
        new[mine + "mixer_norm.weight"] = t(ours + "mixer_norm.gain")
        new[mine + "ffn_norm.weight"] = t(ours + "ffn_norm.gain")
        new[mine + "ffn.gate_up.weight"] = lin(ours + "ffn.gate.weight", ours + "ffn.up.weight")
        new[mine + "ffn.down.weight"] = lin(ours + "ffn.down.weight")
        new[mine + "mixer.qkv.weight"] = lin(m + "q.weight", m + "k.weight", m + "v.weight")
        new[mine + "mixer.out.weight"] = lin(m + "out.weight")
        if not cfg.is_transformer:
            new[mine + "mixer.conv.weight"] = torch.cat(   # ours (K, C) -> (C, 1, K) per stream
                [t(m + f"{n}_conv.kernel").T[:, None, :] for n in "qkv"], dim=0)
            new[mine + "mixer.gates_down.weight"] = lin(m + "gates.down.weight")
            new[mine + "mixer.gates_up.weight"] = lin(m + "gates.up.weight")
            new[mine + "mixer.gates_up.bias"] = t(m + "gates.bias")
            new[mine + "mixer.out_norm.weight"] = t(m + "out_norm.gain")
            new[mine + "mixer.out_gate.weight"] = lin(m + "out_gate.weight")
    own = dict(model.named_parameters())
    if set(own) != set(new):
        raise ValueError(f"parameter names differ: {sorted(set(own) ^ set(new))}")
    with torch.no_grad():
        for name, p in own.items():
            if tuple(p.shape) != tuple(new[name].shape):
                raise ValueError(f"{name}: shape {tuple(p.shape)} here, {tuple(new[name].shape)} from ours")
            p.copy_(new[name])


def param_count(model):
    return sum(p.numel() for p in model.parameters())


def set_precision(precision):
    """TF32 on for "tf32" and "bf16" (whose few fp32 products may use it, as users set it), off
    for "fp32"; matmuls and cuDNN convolutions alike. Returns the autocast context of the forward."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    torch.backends.cuda.matmul.allow_tf32 = precision != "fp32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"
    if precision == "bf16":
        return lambda: torch.autocast(device_type="cuda" if torch.cuda.is_available() else "cpu",
                                      dtype=torch.bfloat16)
    return contextlib.nullcontext


def make_step(model, cfg, precision):
    """step(tokens) -> loss: one training step on int tokens (B, T + 1) on the model's device."""
    autocast = set_precision(precision)
    decay = [p for p in model.parameters() if p.ndim == 2]          # embedding and projections
    rest = [p for p in model.parameters() if p.ndim != 2]           # gains, biases, conv kernels
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    kwargs = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps)
    try:
        opt = torch.optim.AdamW(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):          # no fused AdamW for this device / build
        opt = torch.optim.AdamW(groups, foreach=True, **kwargs)
    params = list(model.parameters())

    def step(tokens):
        with autocast():
            loss = model.loss(tokens)
        loss.backward()
        if cfg.clip:
            torch.nn.utils.clip_grad_norm_(params, cfg.clip, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    step.fused = opt.defaults.get("fused", False)
    step.optimizer = opt                       # for a caller's learning-rate schedule
    return step


def naive_gated_delta_rule(q, k, v, g, beta):
    """The gated delta rule token by token (q, k ℓ2-normalised here, scale 1): a CPU stand-in for
    FLA's kernel, for checking the model's layout against mirascore's; slow."""
    def l2(x):
        return x / torch.sqrt((x * x).sum(-1, keepdim=True) + 1e-6)
    q, k = l2(q), l2(k)
    B, T, H, D = k.shape
    S = q.new_zeros(B, H, D, v.shape[-1])
    out = []
    for t in range(T):
        kt, vt, qt = k[:, t], v[:, t], q[:, t]                        # (B, H, D)
        S = torch.exp(g[:, t])[..., None, None].to(S.dtype) * S
        err = vt - torch.einsum("bhk,bhkv->bhv", kt, S)
        S = S + beta[:, t][..., None, None].to(S.dtype) * kt[..., :, None] * err[..., None, :]
        out.append(torch.einsum("bhk,bhkv->bhv", qt, S))
    return torch.stack(out, dim=1)


__all__ = ["LM", "load_params", "make_step", "param_count", "naive_gated_delta_rule", "PRECISIONS"]
