"""How the anchored chunk reads a memory's parameters (docs/derivations/chunked.md §1, §3).

A memory's `forward(read, X)` touches its parameters only through `read(p, Z)` = Z W_pᵀ, and its
`backward` only through `read_vjp(p, dO)` (mirascore.memory). The chunk supplies the reads:

- `WeightReads(xp, W, c)`: weights held as arrays, rows scaled by c (None: 1): the gradient point
  c_i·W̄ at the chunk's anchor, the anchor's weights W̄ for the in-chunk reads of kl and sigmoid,
  and the chunk's last read of the returned state;
- `DualReads`: the in-chunk reads of the states s_t = A_t s̄ + m_t S̄ − Σ_{i≤t} C_ti e_i f_iᵀ,
  scaled by the gate's ν̄, evaluated in the dual form without per-token matrices.

Each records what its VJPs need; the VJP callbacks accumulate the parameter-side cotangents into
lists the caller owns and return the cotangent of the read's input.
"""


def _scaled(x, c):
    """x (..., b, n) with row i scaled by c_i; c None means 1."""
    return x if c is None else c[..., None] * x


def _constant(nu):
    """A read scale given as a Python number: no gradient, and 1 costs no multiplication."""
    return isinstance(nu, (int, float))


def _times(nu, x):
    return x if _constant(nu) and nu == 1 else nu * x


def _add(total, x):
    """total + x, where a None total (nothing accumulated yet) costs no zeros and no addition."""
    return x if total is None else total + x


class WeightReads:
    """O_p = c ⊙ (Z W_pᵀ) for weights W (per parameter, (..., m, n)) and row scales c (..., b)."""

    def __init__(self, xp, W, c=None):
        self.xp, self.W, self.c = xp, W, c
        self.inputs = [None] * len(W)            # Z_p: the right factors of the gradient
        self.products = [None] * len(W)          # Z_p W_pᵀ before the row scale (for dc)
        self.input_products = [None] * len(W)    # dO_p W_p of the gradient path (for dc)

    def read(self, p, Z):
        O = self.xp.matmul(Z, self.W[p].swapaxes(-1, -2))
        self.inputs[p], self.products[p] = Z, O
        return _scaled(O, self.c)

    def input_vjp(self, p, dO):
        """c ⊙ (dO W_p), the cotangent of read p's input, with nothing accumulated: the gradient
        path of the chunk's forward (its dO_p are the gradient's left factors)."""
        h = self.xp.matmul(dO, self.W[p])
        self.input_products[p] = h
        return _scaled(h, self.c)

    def vjp(self, dW, dc, extra=None):
        """The read_vjp of a backward pass: accumulates dW[p] += (c ⊙ dO)ᵀ Z_p and dc[0] +=
        rowsum(dO ⊙ Z_p W_pᵀ) (entries None until something arrives), and returns c ⊙ (dO W_p)
        plus extra[p] (cotangents of Z_p arriving by another path, e.g. the gradient's right
        factors)."""
        xp, c = self.xp, self.c

        def read_vjp(p, dO):
            dO_c = _scaled(dO, c)
            dW[p] = _add(dW[p], xp.matmul(dO_c.swapaxes(-1, -2), self.inputs[p]))
            if c is not None:
                dc[0] = _add(dc[0], (dO * self.products[p]).sum(axis=-1))
            dZ = xp.matmul(dO_c, self.W[p])
            return dZ if extra is None else dZ + extra[p]
        return read_vjp

    def in_chunk_vjp(self, acc):
        """The read_vjp of the chunk's in-chunk reads: parameter cotangents into acc.dW_bar."""
        return self.vjp(acc.dW_bar, None)

    def input_vjp_vjp(self, dW, dc):
        """The VJP of `input_vjp`, (dO, W_p, c) ↦ c ⊙ (dO W_p), for a cotangent ddZ: accumulates
        dW[p] += dOᵀ (c ⊙ ddZ) and dc[0] += rowsum(ddZ ⊙ dO W_p); returns the cotangent of dO."""
        xp, c = self.xp, self.c

        def vjp_vjp(p, dO, ddZ):
            ddZ_c = _scaled(ddZ, c)
            dW[p] = _add(dW[p], xp.matmul(dO.swapaxes(-1, -2), ddZ_c))
            if c is not None:
                dc[0] = _add(dc[0], (ddZ * self.input_products[p]).sum(axis=-1))
            return xp.matmul(ddZ_c, self.W[p].swapaxes(-1, -2))
        return vjp_vjp


class DualReads:
    """In-chunk reads o_t = ν [A_t s̄ x_t + m_t S̄ x_t − Σ_{i≤t} C_ti e_i (f_i·x_t)] for rows t < b,
    per parameter: b×b matrices and matmuls, never a per-token state.

    rows: the coefficients' rows (A (..., t), m (..., t) or None, C (..., t, b)); s_bar, S_bar
    (S_bar None for gd) and factors (E, F) per parameter; nu per parameter: the gate's read scale,
    a Python number (a constant) or an array (..., 1, 1) that depends on s̄.
    """

    def __init__(self, xp, rows, s_bar, S_bar, factors, nu):
        self.xp, self.rows, self.s_bar, self.S_bar, self.factors, self.nu = \
            xp, rows, s_bar, S_bar, factors, nu
        self.inputs = [None] * len(s_bar)
        self.raw = [None] * len(s_bar)           # o_t before the scale ν

    def read(self, p, X):
        xp, (A, m, C), (E, F) = self.xp, self.rows, self.factors[p]
        O = A[..., None] * xp.matmul(X, self.s_bar[p].swapaxes(-1, -2)) \
            - xp.matmul(C * xp.matmul(X, F.swapaxes(-1, -2)), E)
        if m is not None:
            O = O + m[..., None] * xp.matmul(X, self.S_bar[p].swapaxes(-1, -2))
        self.inputs[p], self.raw[p] = X, O
        return _times(self.nu[p], O)

    def in_chunk_vjp(self, acc):
        """read_vjp accumulating into the chunk's cotangents `acc` (ds_bar, dS_bar, dnu, dE, dF,
        dA_rows, dm_rows, dC_rows); returns dX."""
        xp, (A, m, C) = self.xp, self.rows

        def read_vjp(p, dO):
            if not _constant(self.nu[p]):
                acc.dnu[p] = _add(acc.dnu[p], (dO * self.raw[p]).sum(axis=(-2, -1), keepdims=True))
            G = _times(self.nu[p], dO)
            X, base, (E, F) = self.inputs[p], self.s_bar[p], self.factors[p]
            AG = A[..., None] * G
            acc.dA_rows = acc.dA_rows + (G * xp.matmul(X, base.swapaxes(-1, -2))).sum(axis=-1)
            acc.ds_bar[p] = acc.ds_bar[p] + xp.matmul(AG.swapaxes(-1, -2), X)
            H = xp.matmul(G, E.swapaxes(-1, -2))             # (t, b): ⟨G_t, e_i⟩
            Rx = xp.matmul(X, F.swapaxes(-1, -2))            # (t, b): ⟨f_i, x_t⟩
            CH = C * H
            dX = xp.matmul(AG, base) - xp.matmul(CH, F)
            acc.dF[p] = acc.dF[p] - xp.matmul(CH.swapaxes(-1, -2), X)
            acc.dE[p] = acc.dE[p] - xp.matmul((C * Rx).swapaxes(-1, -2), G)
            acc.dC_rows = acc.dC_rows - H * Rx
            if m is not None:
                S_bar = self.S_bar[p]
                mG = m[..., None] * G
                acc.dm_rows = acc.dm_rows + (G * xp.matmul(X, S_bar.swapaxes(-1, -2))).sum(axis=-1)
                acc.dS_bar[p] = acc.dS_bar[p] + xp.matmul(mG.swapaxes(-1, -2), X)
                dX = dX + xp.matmul(mG, S_bar)
            return dX
        return read_vjp
