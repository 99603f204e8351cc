// Fused per-chunk kernels of the chunked delta rule (mirascore/chunk/delta_rule.py), float32 with
// TF32 tensor-core products (mma.sync m16n8k8, operands rounded to TF32, fp32 accumulation): what
// the TF32 GEMM precision permits. Compiled by CuPy's RawModule from delta_rule_kernels.py.
// One thread block (8 warps) per chunk; a chunk's operands are staged in shared memory once and
// every product of the chunk reads them there, instead of a round trip through GPU memory per product.
//
// chunk_prepare: per chunk, from K (C x dk), V (C x dv), g = cumsum log alpha, b, c (C):
//     A_ti = b_t e^{g_t - g_i} (K K^T)_ti  (i < t, else 0),  Tinv = (I + A)^-1,
//     Wm = Tinv diag(b e^g) K,  Um = Tinv diag(c) V
// chunk_output: per chunk and tile of 64 columns of dv, from Q, K (C x dk), the chunk's starting
//     state S (dv x dk), the pseudo-values U (C x dv) and g:
//     Y = diag(e^g) Q S^T + (D . Q K^T) U,   D_ti = e^{g_t - g_i} (i <= t, else 0)
// (ArrayPieces.chunk_prepare / chunk_output in delta_rule.py are the same formulas on arrays.)
// Shapes: K, Q, Wm (Bn*N, C, dk); V, U, Um, Y (Bn*N, C, dv); S (Bn*N, dv, dk); g, b, c (Bn*N, C);
// Tinv (Bn*N, C, C); contiguous. C <= 64, dk <= 128. Padding rows and columns (up to multiples of
// 16) are zero in shared memory, so every tile is whole; only entries inside the shapes are written.

#define NT 256                   // threads per block: 8 warps
#define NW (NT / 32)
#define MAXC 64
#define MAXK 128
#define VT 64                    // columns of dv per tile
#define KST (MAXK + 4)           // shared-memory row strides (the pad staggers rows across banks)
#define CST (MAXC + 4)
#define VST (VT + 4)

__device__ __forceinline__ unsigned tf32(float x)
{
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// d += a b for one 16 x 8 x 8 tile: a (16 x 8, row-major fragment), b (8 x 8, column-major fragment)
__device__ __forceinline__ void mma_tf32(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2])
{
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                 "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// A warp's 16 x 16 tile: acc += sum_{k < depth} a(i, k) b(k, j), from shared memory, where
// a(i, k) = A[i * ar + k * ac] and b(k, j) = B[k * br + j * bc] (A, B at the tile's first row and
// column; strides pick row- or column-major storage). depth: a multiple of 8.
// Lane l holds acc[h][r] = entry (g + 8 (r / 2), 8 h + 2 t + r % 2), g = l / 4, t = l % 4.
__device__ __forceinline__ void tile_mma(float (&acc)[2][4], const float* A, int ar, int ac,
                                         const float* B, int br, int bc, int depth)
{
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    for (int k = 0; k < depth; k += 8) {
        const unsigned a[4] = {tf32(A[g * ar + (k + t) * ac]), tf32(A[(g + 8) * ar + (k + t) * ac]),
                               tf32(A[g * ar + (k + t + 4) * ac]), tf32(A[(g + 8) * ar + (k + t + 4) * ac])};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const unsigned b[2] = {tf32(B[(k + t) * br + (8 * h + g) * bc]),
                                   tf32(B[(k + t + 4) * br + (8 * h + g) * bc])};
            mma_tf32(acc[h], a, b);
        }
    }
}

__device__ __forceinline__ void zero(float (&acc)[2][4])
{
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[h][r] = 0.f;
}

// Calls f(i, j, value) for each entry of a warp's tile (i, j: the tile's row and column).
template <class F>
__device__ __forceinline__ void tile_entries(const float (&acc)[2][4], F f)
{
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int r = 0; r < 4; ++r) f(g + 8 * (r / 2), 8 * h + 2 * t + r % 2, acc[h][r]);
}

// rows x cols of src (row stride ld) into dst (row stride dst_ld), times scale(row); zeros up to
// prows x pcols
template <class S>
__device__ __forceinline__ void stage(float* dst, int dst_ld, const float* __restrict__ src, int ld,
                                      int rows, int cols, int prows, int pcols, S scale)
{
    for (int e = threadIdx.x; e < prows * pcols; e += NT) {
        const int i = e / pcols, j = e % pcols;
        dst[i * dst_ld + j] = (i < rows && j < cols) ? src[(long)i * ld + j] * scale(i) : 0.f;
    }
}

__device__ __forceinline__ int round16(int n) { return (n + 15) / 16 * 16; }

extern "C" __global__ void __launch_bounds__(NT)
chunk_prepare(const float* __restrict__ K, const float* __restrict__ V, const float* __restrict__ g,
              const float* __restrict__ b, const float* __restrict__ c,
              float* __restrict__ Tinv, float* __restrict__ Wm, float* __restrict__ Um,
              int C, int dk, int dv)
{
    extern __shared__ __align__(16) float smem[];
    float* Ks = smem;                    // [MAXC][KST]  K, then diag(b e^g) K
    float* As = Ks + MAXC * KST;         // [MAXC][CST]  A
    float* Ts = As + MAXC * CST;         // [MAXC][CST]  Tinv
    float* Vs = Ts + MAXC * CST;         // [MAXC][VST]  diag(c) V, one tile of columns
    float* gs = Vs + MAXC * VST;         // [MAXC] g, then [MAXC..2 MAXC) b e^g, [2 MAXC..3 MAXC) c
    const long n = blockIdx.x;
    const int warp = threadIdx.x / 32, CP = round16(C), DP = round16(dk);
    const float* Kn = K + n * C * dk;
    for (int t = threadIdx.x; t < MAXC; t += NT) {
        const bool in = t < C;
        const float gt = in ? g[n * C + t] : 0.f;
        gs[t] = gt;
        gs[MAXC + t] = in ? b[n * C + t] * expf(gt) : 0.f;
        gs[2 * MAXC + t] = in ? c[n * C + t] : 0.f;
    }
    stage(Ks, KST, Kn, dk, C, dk, CP, DP, [](int) { return 1.f; });
    __syncthreads();

    // A = strictly lower part of diag(b) (D . K K^T); tiles above the diagonal are zero
    const int ct = CP / 16;
    for (int tile = warp; tile < ct * ct; tile += NW) {
        const int i0 = tile / ct * 16, j0 = tile % ct * 16;
        float acc[2][4];
        zero(acc);
        if (j0 <= i0) tile_mma(acc, Ks + i0 * KST, KST, 1, Ks + j0 * KST, 1, KST, DP);
        tile_entries(acc, [&](int i, int j, float v) {
            const int t = i0 + i, s = j0 + j;
            As[t * CST + s] = (s < t && t < C) ? b[n * C + t] * expf(gs[t] - gs[s]) * v : 0.f;
        });
    }
    __syncthreads();

    // Tinv by forward substitution, thread j owning column j (its column needs no other thread's);
    // meanwhile the other threads scale K's rows by b e^g (K K^T is done with them)
    if (threadIdx.x < CP) {
        const int j = threadIdx.x;
        for (int i = 0; i < CP; ++i) {
            float s = 0.f;
            for (int m = j; m < i; ++m) s += As[i * CST + m] * Ts[m * CST + j];
            const float v = i < j ? 0.f : (i == j ? 1.f : -s);
            Ts[i * CST + j] = v;
            if (i < C && j < C) Tinv[(n * C + i) * C + j] = v;
        }
    } else {
        for (int e = threadIdx.x - CP; e < CP * DP; e += NT - CP) {
            const int i = e / DP, k = e % DP;
            Ks[i * KST + k] *= gs[MAXC + i];
        }
    }
    __syncthreads();

    // Wm = Tinv (diag(b e^g) K)
    const int kt = DP / 16;
    for (int tile = warp; tile < ct * kt; tile += NW) {
        const int i0 = tile / kt * 16, k0 = tile % kt * 16;
        float acc[2][4];
        zero(acc);
        tile_mma(acc, Ts + i0 * CST, CST, 1, Ks + k0, KST, 1, CP);
        tile_entries(acc, [&](int i, int k, float v) {
            if (i0 + i < C && k0 + k < dk) Wm[(n * C + i0 + i) * dk + k0 + k] = v;
        });
    }

    // Um = Tinv (diag(c) V), a tile of VT columns at a time
    for (int v0 = 0; v0 < dv; v0 += VT) {
        const int cols = min(VT, dv - v0);
        __syncthreads();                 // the previous tile's products are done with Vs
        stage(Vs, VST, V + n * C * dv + v0, dv, C, cols, CP, VT, [&](int t) { return gs[2 * MAXC + t]; });
        __syncthreads();
        for (int tile = warp; tile < ct * (VT / 16); tile += NW) {
            const int i0 = tile / (VT / 16) * 16, j0 = tile % (VT / 16) * 16;
            float acc[2][4];
            zero(acc);
            tile_mma(acc, Ts + i0 * CST, CST, 1, Vs + j0, VST, 1, CP);
            tile_entries(acc, [&](int i, int j, float v) {
                if (i0 + i < C && j0 + j < cols) Um[(n * C + i0 + i) * dv + v0 + j0 + j] = v;
            });
        }
    }
}

extern "C" __global__ void __launch_bounds__(NT)
chunk_output(const float* __restrict__ Q, const float* __restrict__ K, const float* __restrict__ S,
             const float* __restrict__ U, const float* __restrict__ g, float* __restrict__ Y,
             int C, int dk, int dv)
{
    extern __shared__ __align__(16) float smem[];
    float* Qs = smem;                    // [MAXC][KST]  Q
    float* Ks = Qs + MAXC * KST;         // [MAXC][KST]  K, then rows v0.. of S
    float* Ps = Ks + MAXC * KST;         // [MAXC][CST]  D . Q K^T
    float* Us = Ps + MAXC * CST;         // [MAXC][VST]  U, this block's columns
    float* gs = Us + MAXC * VST;         // [MAXC]
    const long n = blockIdx.x;
    const int v0 = blockIdx.y * VT, cols = min(VT, dv - v0);
    const int warp = threadIdx.x / 32, CP = round16(C), DP = round16(dk), ct = CP / 16;
    const auto one = [](int) { return 1.f; };
    for (int t = threadIdx.x; t < MAXC; t += NT) gs[t] = t < C ? g[n * C + t] : 0.f;
    stage(Qs, KST, Q + n * C * dk, dk, C, dk, CP, DP, one);
    stage(Ks, KST, K + n * C * dk, dk, C, dk, CP, DP, one);
    stage(Us, VST, U + n * C * dv + v0, dv, C, cols, CP, VT, one);
    __syncthreads();

    for (int tile = warp; tile < ct * ct; tile += NW) {
        const int i0 = tile / ct * 16, j0 = tile % ct * 16;
        float acc[2][4];
        zero(acc);
        if (j0 <= i0) tile_mma(acc, Qs + i0 * KST, KST, 1, Ks + j0 * KST, 1, KST, DP);
        tile_entries(acc, [&](int i, int j, float v) {
            const int t = i0 + i, s = j0 + j;
            Ps[t * CST + s] = (s <= t && t < C) ? expf(gs[t] - gs[s]) * v : 0.f;
        });
    }
    __syncthreads();                     // K is no longer needed: its buffer takes S's rows
    stage(Ks, KST, S + (n * dv + v0) * dk, dk, cols, dk, VT, DP, one);
    __syncthreads();

    for (int tile = warp; tile < ct * (VT / 16); tile += NW) {
        const int i0 = tile / (VT / 16) * 16, j0 = tile % (VT / 16) * 16;
        float acc[2][4];
        zero(acc);
        tile_mma(acc, Qs + i0 * KST, KST, 1, Ks + j0 * KST, 1, KST, DP);     // Q S^T
        const int lane = threadIdx.x % 32;
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[h][r] *= expf(gs[i0 + lane / 4 + 8 * (r / 2)]);
        tile_mma(acc, Ps + i0 * CST, CST, 1, Us + j0, VST, 1, CP);           // + (D . Q K^T) U
        tile_entries(acc, [&](int i, int j, float v) {
            if (i0 + i < C && j0 + j < cols) Y[(n * C + i0 + i) * dv + v0 + j0 + j] = v;
        });
    }
}
