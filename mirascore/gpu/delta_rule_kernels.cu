// CUDA kernels of the chunked delta recurrence (mirascore/chunk/delta.py), compiled by CuPy's
// RawModule from mirascore/gpu/delta_rule_kernels.py with -DREAL=float (BV=32) or -DREAL=double (BV=16).
// Arithmetic and accumulation are in REAL throughout (fp32 accumulation for float).
//
// unit_lower_inverse: (I + A)^-1 of a strictly lower triangular C x C block, C <= 64.
//   One thread block per matrix, thread j owns column j and forward-substitutes it:
//   T[i][j] = [i == j] - sum_{j <= m < i} A[i][m] T[m][j]. Every entry of the output is written.
//
// state_scan: the sequential chunk-to-chunk loop, register-tiled, with Qm staged through shared
// memory 16 rows at a time and A / H / decay loaded before they are needed (the loop is bound by
// memory latency, not arithmetic), shared by forward and backward:
//   for chunks n (in order, or reverse):
//       Xs[n] = X;  O_n = A_n + sign_a * P_n X^T;  X <- decay_n X + H_n + sign_b * O_n^T Qm_n
//   A, O (Bn, N, C, dv); P, Qm (Bn, N, C, dk); decay (Bn, N); X0, Xout (Bn, dv, dk);
//   H, Xs (Bn, N, dv, dk). One thread block per (batch element, tile of BV rows of X); the tile of X
//   stays in shared memory for the whole sequence. C <= 64, dk <= 128.

#ifndef REAL
#define REAL float
#endif
#ifndef BV
#define BV 32
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1              // state_scan blocks resident per SM that the register budget must allow
#endif

#define NT 256                    // threads per block in state_scan
#define MAXC 64                   // largest chunk
#define MAXK 128                  // largest d_k
#define KT 32                     // k-slice of P staged in shared memory
// state_scan tiling: phase 1 computes O (C x BV) = A + sign_a P X^T, thread (cg, vg) owning rows
// cg + 16 r (r < CT1) and columns vg + VG1 s (s < VT1); phase 2 updates X (BV x dk), thread
// (wg, kg) owning rows wg + WG2 r (r < VT2) and columns kg + 32 s (s < KT2).
#define CG1 16
#define VG1 (NT / CG1)
#define CT1 (MAXC / CG1)
#define VT1 (BV / VG1)
#define KG2 32
#define WG2 (NT / KG2)
#define KT2 (MAXK / KG2)
#define VT2 (BV / WG2)
#define CQ 16                     // rows of Qm staged per pass (CQ * MAXK <= MAXC * (KT + 1))

extern "C" __global__ void unit_lower_inverse(const REAL* __restrict__ A, REAL* __restrict__ Tout, int C)
{
    __shared__ REAL Ts[MAXC * MAXC];
    const long base = (long)blockIdx.x * C * C;
    const int j = threadIdx.x;
    if (j >= C) return;                       // no block-wide synchronisation below
    const REAL* a = A + base;
    for (int i = 0; i < C; ++i) {
        REAL t;
        if (i < j) {
            t = (REAL)0;
        } else if (i == j) {
            t = (REAL)1;
        } else {
            REAL s = (REAL)0;
            for (int m = j; m < i; ++m) s += a[i * C + m] * Ts[m * MAXC + j];
            t = -s;
        }
        Ts[i * MAXC + j] = t;
        Tout[base + i * C + j] = t;
    }
}

extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS)
state_scan(const REAL* __restrict__ A, const REAL* __restrict__ P, const REAL* __restrict__ Qm,
           const REAL* __restrict__ decay, const REAL* __restrict__ X0, const REAL* __restrict__ H,
           REAL* __restrict__ Xs, REAL* __restrict__ O, REAL* __restrict__ Xout,
           int N, int C, int dv, int dk, REAL sign_a, REAL sign_b, int has_h, int reverse)
{
    __shared__ REAL Xsh[BV][MAXK + 1];
    __shared__ REAL Stage[MAXC * (KT + 1)];          // P slices in phase 1, Qm slices in phase 2
    __shared__ REAL Osh[MAXC][BV + 1];
    const int tid = threadIdx.x;
    const long b = blockIdx.x;
    const int v0 = blockIdx.y * BV;
    const int cg = tid / VG1, vg = tid % VG1;        // phase 1
    const int wg = tid / KG2, kg = tid % KG2;        // phase 2

#pragma unroll
    for (int r = 0; r < VT2; ++r)
#pragma unroll
        for (int s = 0; s < KT2; ++s) {
            const int v = wg + WG2 * r, k = kg + KG2 * s;
            REAL x = (REAL)0;
            if (v0 + v < dv && k < dk) x = X0[(b * dv + v0 + v) * dk + k];
            Xsh[v][k] = x;
        }
    __syncthreads();

    for (int step = 0; step < N; ++step) {
        const int n = reverse ? N - 1 - step : step;
        const long bn = b * N + n;
        const REAL dec = decay[bn];

#pragma unroll
        for (int r = 0; r < VT2; ++r)
#pragma unroll
            for (int s = 0; s < KT2; ++s) {
                const int v = wg + WG2 * r, k = kg + KG2 * s;
                if (v0 + v < dv && k < dk) Xs[(bn * dv + v0 + v) * dk + k] = Xsh[v][k];
            }

        // phase 1: O = A + sign_a P X^T; A loaded first so its latency hides behind the products
        const REAL* An = A + bn * C * dv;
        REAL a_reg[CT1][VT1];
#pragma unroll
        for (int r = 0; r < CT1; ++r)
#pragma unroll
            for (int s = 0; s < VT1; ++s) {
                const int c = cg + CG1 * r, v = vg + VG1 * s;
                a_reg[r][s] = (c < C && v0 + v < dv) ? An[c * dv + v0 + v] : (REAL)0;
            }
        REAL acc[CT1][VT1];
#pragma unroll
        for (int r = 0; r < CT1; ++r)
#pragma unroll
            for (int s = 0; s < VT1; ++s) acc[r][s] = (REAL)0;
        const REAL* Pn = P + bn * C * dk;
        for (int k0 = 0; k0 < dk; k0 += KT) {
#pragma unroll
            for (int e0 = 0; e0 < MAXC * KT; e0 += NT) {
                const int e = e0 + tid, c = e / KT, kk = e % KT;
                Stage[c * (KT + 1) + kk] = (c < C && k0 + kk < dk) ? Pn[c * dk + k0 + kk] : (REAL)0;
            }
            __syncthreads();
            const int kmax = min(KT, dk - k0);
            for (int kk = 0; kk < kmax; ++kk) {
                REAL x[VT1], p[CT1];
#pragma unroll
                for (int s = 0; s < VT1; ++s) x[s] = Xsh[vg + VG1 * s][k0 + kk];
#pragma unroll
                for (int r = 0; r < CT1; ++r) p[r] = Stage[(cg + CG1 * r) * (KT + 1) + kk];
#pragma unroll
                for (int r = 0; r < CT1; ++r)
#pragma unroll
                    for (int s = 0; s < VT1; ++s) acc[r][s] += p[r] * x[s];
            }
            __syncthreads();
        }
        REAL* On = O + bn * C * dv;
#pragma unroll
        for (int r = 0; r < CT1; ++r)
#pragma unroll
            for (int s = 0; s < VT1; ++s) {
                const int c = cg + CG1 * r, v = vg + VG1 * s;
                REAL o = (REAL)0;
                if (c < C && v0 + v < dv) {
                    o = a_reg[r][s] + sign_a * acc[r][s];
                    On[c * dv + v0 + v] = o;
                }
                Osh[c][v] = o;
            }
        __syncthreads();

        // phase 2: X <- dec X + H + sign_b O^T Qm, Qm staged CQ rows at a time; H loaded first
        REAL h_reg[VT2][KT2];
#pragma unroll
        for (int r = 0; r < VT2; ++r)
#pragma unroll
            for (int s = 0; s < KT2; ++s) {
                const int v = wg + WG2 * r, k = kg + KG2 * s;
                h_reg[r][s] = (has_h && v0 + v < dv && k < dk) ? H[(bn * dv + v0 + v) * dk + k] : (REAL)0;
            }
        REAL acc2[VT2][KT2];
#pragma unroll
        for (int r = 0; r < VT2; ++r)
#pragma unroll
            for (int s = 0; s < KT2; ++s) acc2[r][s] = (REAL)0;
        const REAL* Qn = Qm + bn * C * dk;
        for (int c0 = 0; c0 < C; c0 += CQ) {
#pragma unroll
            for (int e0 = 0; e0 < CQ * MAXK; e0 += NT) {
                const int e = e0 + tid, c = e / MAXK, k = e % MAXK;
                Stage[e] = (c0 + c < C && k < dk) ? Qn[(c0 + c) * dk + k] : (REAL)0;
            }
            __syncthreads();
            const int cmax = min(CQ, C - c0);
            for (int c = 0; c < cmax; ++c) {
                REAL q[KT2], o[VT2];
#pragma unroll
                for (int s = 0; s < KT2; ++s) q[s] = Stage[c * MAXK + kg + KG2 * s];
#pragma unroll
                for (int r = 0; r < VT2; ++r) o[r] = Osh[c0 + c][wg + WG2 * r];
#pragma unroll
                for (int r = 0; r < VT2; ++r)
#pragma unroll
                    for (int s = 0; s < KT2; ++s) acc2[r][s] += o[r] * q[s];
            }
            __syncthreads();
        }
#pragma unroll
        for (int r = 0; r < VT2; ++r)
#pragma unroll
            for (int s = 0; s < KT2; ++s) {
                const int v = wg + WG2 * r, k = kg + KG2 * s;
                if (k < dk) Xsh[v][k] = dec * Xsh[v][k] + sign_b * acc2[r][s] + h_reg[r][s];
            }
        __syncthreads();
    }

#pragma unroll
    for (int r = 0; r < VT2; ++r)
#pragma unroll
        for (int s = 0; s < KT2; ++s) {
            const int v = wg + WG2 * r, k = kg + KG2 * s;
            if (v0 + v < dv && k < dk) Xout[(b * dv + v0 + v) * dk + k] = Xsh[v][k];
        }
}
