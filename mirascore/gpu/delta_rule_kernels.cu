// CUDA kernels of the chunked delta recurrence (mirascore/chunk/delta.py), compiled by CuPy's
// RawModule from mirascore/gpu/delta_rule_kernels.py with -DREAL=float (BV=32) or -DREAL=double (BV=16).
// Arithmetic and accumulation are in REAL throughout (fp32 accumulation for float).
//
// unit_lower_inverse: (I + A)^-1 of a strictly lower triangular C x C block, C <= 64.
//   One thread block per matrix, thread j owns column j and forward-substitutes it:
//   T[i][j] = [i == j] - sum_{j <= m < i} A[i][m] T[m][j]. Every entry of the output is written.
//
// state_scan: the sequential chunk-to-chunk loop, shared by forward and backward:
//   for chunks n (in order, or reverse):
//       Xs[n] = X;  O_n = A_n + sign_a * P_n X^T;  X <- decay_n X + H_n + sign_b * O_n^T Qm_n
//   A, O (Bn, N, C, dv); P, Qm (Bn, N, C, dk); decay (Bn, N); X0, Xout (Bn, dv, dk);
//   H, Xs (Bn, N, dv, dk). One thread block per (batch element, tile of BV rows of X); the tile of X
//   stays in shared memory for the whole sequence. C <= 64, dk <= 128.
//   The loop is bound by latency, so the loads are pipelined: P and Qm stream through shared memory
//   as one sequence of equal slices (per chunk: P in KT-column slices, then Qm in CQ-row slices) in a
//   ring of STAGES buffers filled by cp.async (16-byte copies where rows are 16-byte aligned), so
//   that while one slice is multiplied the next STAGES - 1 are in flight, across chunk boundaries
//   too; one barrier per slice both publishes it and frees the buffer read before it. A, H and decay
//   of a chunk go to registers at its start, behind the products. Shared-memory reads are 16-byte
//   vectors (with the loads hidden, shared-memory traffic was the next limit); each thread writes
//   its own elements of X to Xs / Xout as it updates them. Shared memory is dynamic: the launch must
//   pass SMEM_BYTES (below; delta_rule_kernels.py's _state_scan_smem computes the same number).

#ifndef REAL
#define REAL float
#endif
#ifndef BV
#define BV 32
#endif
#ifndef MIN_BLOCKS
#define MIN_BLOCKS 1              // state_scan blocks resident per SM that the register budget must allow
#endif
#ifndef STAGES
#define STAGES 3                  // state_scan's ring of slice buffers (>= 2): STAGES - 1 slices in flight
#endif

#define NT 256                    // threads per block in state_scan
#define MAXC 64                   // largest chunk
#define MAXK 128                  // largest d_k
#define VW (16 / (int)sizeof(REAL))  // REALs per 16-byte vector
#define KT 32                     // columns of P per slice
#define CQ 16                     // rows of Qm per slice (CQ * MAXK <= SLICE)
#define XST (MAXK + VW)           // row strides in shared memory: X, a P slice (16-byte rows, and the
#define PST (KT + VW)             // pad shifts successive rows by 16 bytes: no bank conflicts)
#define SLICE (MAXC * PST)        // REALs per slice buffer
// state_scan tiling: phase 1 computes O (C x BV) = A + sign_a P X^T, thread (cg, vg) owning rows
// cg + 16 r (r < CT1) and columns vg + VG1 s (s < VT1); phase 2 updates X (BV x dk), thread
// (vq, kq) owning rows VT2 vq + r (r < VT2) and columns KQ kq + s (s < KQ), a warp 4 VT2 rows by 32
// columns (its reads of O and of Qm: 128 bytes each).
#define CG1 16
#define VG1 (NT / CG1)
#define CT1 (MAXC / CG1)
#define VT1 (BV / VG1)
#define KQ 4
#define VT2 (BV * MAXK / (NT * KQ))
#define SMEM_BYTES ((BV * XST + MAXC * BV + STAGES * SLICE) * (int)sizeof(REAL))

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

struct __align__(16) Vec { REAL v[VW]; };

// N consecutive REALs from / to 16-byte-aligned shared memory, as 16-byte accesses
template <int N>
__device__ __forceinline__ void lds(REAL (&r)[N], const REAL* p)
{
#pragma unroll
    for (int i = 0; i < N; i += VW) {
        const Vec t = *reinterpret_cast<const Vec*>(p + i);
#pragma unroll
        for (int j = 0; j < VW; ++j) r[i + j] = t.v[j];
    }
}

template <int N>
__device__ __forceinline__ void sts(REAL* p, const REAL (&r)[N])
{
#pragma unroll
    for (int i = 0; i < N; i += VW) {
        Vec t;
#pragma unroll
        for (int j = 0; j < VW; ++j) t.v[j] = r[i + j];
        *reinterpret_cast<Vec*>(p + i) = t;
    }
}

// the first `left` of N consecutive REALs of global memory (the rest 0); 16-byte accesses when vec
template <int N>
__device__ __forceinline__ void ldg(REAL (&r)[N], const REAL* p, int left, bool vec)
{
#pragma unroll
    for (int i = 0; i < N; i += VW) {
        if (vec && i + VW <= left) {
            const Vec t = *reinterpret_cast<const Vec*>(p + i);
#pragma unroll
            for (int j = 0; j < VW; ++j) r[i + j] = t.v[j];
        } else {
#pragma unroll
            for (int j = 0; j < VW; ++j) r[i + j] = (i + j < left) ? p[i + j] : (REAL)0;
        }
    }
}

template <int N>
__device__ __forceinline__ void stg(REAL* p, const REAL (&r)[N], int left, bool vec)
{
#pragma unroll
    for (int i = 0; i < N; i += VW) {
        if (vec && i + VW <= left) {
            Vec t;
#pragma unroll
            for (int j = 0; j < VW; ++j) t.v[j] = r[i + j];
            *reinterpret_cast<Vec*>(p + i) = t;
        } else {
#pragma unroll
            for (int j = 0; j < VW; ++j)
                if (i + j < left) p[i + j] = r[i + j];
        }
    }
}

// Asynchronous global -> shared copies (sm_80+; plain loads before), zero-filling when !ok: 16 bytes
// (cached in L2 only: each slice is read once per block) or one REAL. src must be valid even if !ok.
__device__ __forceinline__ unsigned smem_address(const void* p)
{
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

__device__ __forceinline__ void copy_vec(REAL* dst, const REAL* src, bool ok)
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_address(dst)), "l"(src), "r"(ok ? 16 : 0) : "memory");
#else
    Vec t = {};
    if (ok) t = *reinterpret_cast<const Vec*>(src);
    *reinterpret_cast<Vec*>(dst) = t;
#endif
}

__device__ __forceinline__ void copy_one(REAL* dst, const REAL* src, bool ok)
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], %2, %3;"
                 :: "r"(smem_address(dst)), "l"(src), "n"((int)sizeof(REAL)), "r"(ok ? (int)sizeof(REAL) : 0)
                 : "memory");
#else
    *dst = ok ? *src : (REAL)0;
#endif
}

__device__ __forceinline__ void copy_commit()
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

template <int PENDING>
__device__ __forceinline__ void copy_wait()
{
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" :: "n"(PENDING) : "memory");
#endif
}

// Starts the copy of a ROWS x COLS block (row stride DST) to dst from src (row stride src_stride), in
// chunks of W REALs (W = VW: 16-byte copies, or 1); rows >= rows and columns >= cols are zero-filled.
template <int ROWS, int COLS, int DST, int W>
__device__ __forceinline__ void copy_block(REAL* dst, const REAL* src, int src_stride, int rows, int cols, int tid)
{
    constexpr int CPR = COLS / W, RS = NT / CPR;     // chunks per row, rows per pass of the block
    const int r0 = tid / CPR, c = tid % CPR * W;
    const REAL* s = src + r0 * src_stride + c;
#pragma unroll
    for (int i = 0; i < ROWS / RS; ++i) {
        const bool ok = r0 + i * RS < rows && c < cols;
        const REAL* from = ok ? s + i * RS * src_stride : src;   // a valid address even when unread
        if (W == VW) copy_vec(dst + (r0 + i * RS) * DST + c, from, ok);
        else copy_one(dst + (r0 + i * RS) * DST + c, from, ok);
    }
}

// Starts the copy of slice j of chunk row bn into buf: j < np, columns [j KT, j KT + KT) of P_n
// (layout [MAXC][PST]); else rows [(j - np) CQ, + CQ) of Qm_n (layout [CQ][MAXK]). Entries beyond
// C rows or dk columns are zero-filled, so every slice is written in full.
__device__ __forceinline__ void issue_slice(REAL* buf, const REAL* __restrict__ P, const REAL* __restrict__ Qm,
                                            long bn, int j, int np, int C, int dk, bool vec, int tid)
{
    if (j < np) {
        const int k0 = j * KT;
        const REAL* src = P + bn * C * dk + k0;
        if (vec) copy_block<MAXC, KT, PST, VW>(buf, src, dk, C, dk - k0, tid);
        else copy_block<MAXC, KT, PST, 1>(buf, src, dk, C, dk - k0, tid);
    } else {
        const int c0 = (j - np) * CQ;
        const REAL* src = Qm + (bn * C + c0) * dk;
        if (vec) copy_block<CQ, MAXK, MAXK, VW>(buf, src, dk, C - c0, dk, tid);
        else copy_block<CQ, MAXK, MAXK, 1>(buf, src, dk, C - c0, dk, tid);
    }
}

extern "C" __global__ void __launch_bounds__(NT, MIN_BLOCKS)
state_scan(const REAL* __restrict__ A, const REAL* __restrict__ P, const REAL* __restrict__ Qm,
           const REAL* __restrict__ decay, const REAL* __restrict__ X0, const REAL* __restrict__ H,
           REAL* __restrict__ Xs, REAL* __restrict__ O, REAL* __restrict__ Xout,
           int N, int C, int dv, int dk, REAL sign_a, REAL sign_b, int has_h, int reverse)
{
    extern __shared__ __align__(16) unsigned char smem[];
    REAL* Xsh = reinterpret_cast<REAL*>(smem);       // [BV][XST]
    REAL* Osh = Xsh + BV * XST;                      // [MAXC][BV]
    REAL* Stage = Osh + MAXC * BV;                   // STAGES slice buffers of SLICE REALs
    {
        unsigned have;
        asm("mov.u32 %0, %%dynamic_smem_size;" : "=r"(have));
        if (have < SMEM_BYTES) __trap();             // launched without the shared memory it needs
    }
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const long b = blockIdx.x;
    const int v0 = blockIdx.y * BV;
    const int cg = tid / VG1, vg = tid % VG1;                                        // phase 1
    const int vx = VT2 * ((warp / 4) * 4 + lane / 8), kx = KQ * ((warp % 4) * 8 + lane % 8);  // phase 2
    const int kleft = dk - kx;                       // columns of this thread's KQ that exist
    // 16-byte global accesses where every row start and this thread's columns are 16-byte aligned
    const bool vec = dk % VW == 0 &&
        ((reinterpret_cast<unsigned long long>(P) | reinterpret_cast<unsigned long long>(Qm) |
          reinterpret_cast<unsigned long long>(X0) | reinterpret_cast<unsigned long long>(H) |
          reinterpret_cast<unsigned long long>(Xs) | reinterpret_cast<unsigned long long>(Xout)) & 15) == 0;
    const int np = max(1, (dk + KT - 1) / KT), nq = max(1, (C + CQ - 1) / CQ), ns = np + nq;

    // the next slice to copy: slice ij of chunk step is, into buffer ib (rotating)
    int is = 0, ij = 0, ib = 0;
    auto issue_next = [&]() {
        if (is < N) {
            issue_slice(Stage + ib * SLICE, P, Qm, b * N + (reverse ? N - 1 - is : is), ij, np, C, dk, vec, tid);
            if (++ij == ns) ij = 0, ++is;
            if (++ib == STAGES) ib = 0;
        }
        copy_commit();                               // (maybe empty) group: keeps wait_group's count in step
    };
    // X (this thread's rows and columns) at the start of step `step`: Xs of that chunk, or Xout after the last
    auto store_state = [&](int step, int r, const REAL (&x)[KQ]) {
        if (v0 + vx + r >= dv) return;
        const long row = step < N ? (b * N + (reverse ? N - 1 - step : step)) * dv : b * dv;
        stg(step < N ? Xs + (row + v0 + vx + r) * dk + kx : Xout + (row + v0 + vx + r) * dk + kx, x, kleft, vec);
    };
    // Waits for the next slice and returns its buffer; the buffer read before it is then free for
    // the slice STAGES - 1 ahead.
    int rb = 0;                                      // buffer of the slice to multiply next
    auto next_slice = [&]() -> const REAL* {
        copy_wait<STAGES - 2>();                     // this thread's copies of that slice have landed
        __syncthreads();                             // everyone's have, and everyone is done with buffer rb - 1
        issue_next();
        const REAL* buf = Stage + rb * SLICE;
        if (++rb == STAGES) rb = 0;
        return buf;
    };

    for (int i = 0; i < STAGES - 1; ++i) issue_next();

#pragma unroll
    for (int r = 0; r < VT2; ++r) {
        REAL x[KQ];
        ldg(x, X0 + (b * dv + v0 + vx + r) * dk + kx, v0 + vx + r < dv ? kleft : 0, vec);
        sts(Xsh + (vx + r) * XST + kx, x);
        store_state(0, r, x);
    }

    for (int step = 0; step < N; ++step) {
        const int n = reverse ? N - 1 - step : step;
        const long bn = b * N + n;
        const REAL dec = decay[bn];
        // A and H to registers now: their latency hides behind the products
        const REAL* An = A + bn * C * dv;
        REAL a_reg[CT1][VT1];
#pragma unroll
        for (int r = 0; r < CT1; ++r)
#pragma unroll
            for (int s = 0; s < VT1; ++s) {
                const int c = cg + CG1 * r, v = vg + VG1 * s;
                a_reg[r][s] = (c < C && v0 + v < dv) ? An[c * dv + v0 + v] : (REAL)0;
            }
        REAL h_reg[VT2][KQ];
#pragma unroll
        for (int r = 0; r < VT2; ++r)
            ldg(h_reg[r], H + (bn * dv + v0 + vx + r) * dk + kx, has_h && v0 + vx + r < dv ? kleft : 0, vec);

        // phase 1: O = A + sign_a P X^T, over the P slices
        REAL acc[CT1][VT1];
#pragma unroll
        for (int r = 0; r < CT1; ++r)
#pragma unroll
            for (int s = 0; s < VT1; ++s) acc[r][s] = (REAL)0;
        for (int j = 0; j < np; ++j) {
            const REAL* Ps = next_slice();
            const int k0 = j * KT, kmax = min(KT, dk - k0);
            // 4 columns at a time; columns beyond dk are 0 in both the slice and X
            auto quad = [&](int kk) {
                REAL p[CT1][4], x[VT1][4];
#pragma unroll
                for (int r = 0; r < CT1; ++r) lds(p[r], Ps + (cg + CG1 * r) * PST + kk);
#pragma unroll
                for (int s = 0; s < VT1; ++s) lds(x[s], Xsh + (vg + VG1 * s) * XST + k0 + kk);
#pragma unroll
                for (int q = 0; q < 4; ++q)
#pragma unroll
                    for (int r = 0; r < CT1; ++r)
#pragma unroll
                        for (int s = 0; s < VT1; ++s) acc[r][s] += p[r][q] * x[s][q];
            };
            if (kmax == KT) {                        // the usual full slice: unrolled
#pragma unroll
                for (int kk = 0; kk < KT; kk += 4) quad(kk);
            } else {
                for (int kk = 0; kk < kmax; kk += 4) quad(kk);
            }
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
                Osh[c * BV + v] = o;                 // read after the next slice's barrier
            }

        // phase 2: X <- dec X + H + sign_b O^T Qm, over the Qm slices
        REAL acc2[VT2][KQ];
#pragma unroll
        for (int r = 0; r < VT2; ++r)
#pragma unroll
            for (int s = 0; s < KQ; ++s) acc2[r][s] = (REAL)0;
        for (int j = 0; j < nq; ++j) {
            const REAL* Qs = next_slice();
            const int c0 = j * CQ, cmax = min(CQ, C - c0);
            auto row = [&](int c) {
                REAL q[KQ], o[VT2];
                lds(q, Qs + c * MAXK + kx);
                lds(o, Osh + (c0 + c) * BV + vx);
#pragma unroll
                for (int r = 0; r < VT2; ++r)
#pragma unroll
                    for (int s = 0; s < KQ; ++s) acc2[r][s] += o[r] * q[s];
            };
            if (cmax == CQ) {
#pragma unroll
                for (int c = 0; c < CQ; ++c) row(c);
            } else {
                for (int c = 0; c < cmax; ++c) row(c);
            }
        }
        // each thread updates its own elements; the next slice's barrier orders them before phase 1
#pragma unroll
        for (int r = 0; r < VT2; ++r) {
            REAL x[KQ];
            lds(x, Xsh + (vx + r) * XST + kx);
#pragma unroll
            for (int s = 0; s < KQ; ++s)
                if (s < kleft) x[s] = dec * x[s] + sign_b * acc2[r][s] + h_reg[r][s];
            sts(Xsh + (vx + r) * XST + kx, x);
            store_state(step + 1, r, x);
        }
    }
}
