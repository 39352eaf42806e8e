/* The recurrent network's kernels (leastcontrol.systems.networks.RecurrentEquilibrium), behind the
 * lc_system interface of native.h. On a state row s = [v (H) | o (K)], N = H + K:
 *
 *     f(s)          = tanh(v) Ft + drive - s                      Ft = [W; D]^T, (H, N)
 *     (d_s f)^T a   = -a + [lin * (a M) | 0]                      M = [W; D] or feedback, (N, H)
 *
 * with lin = tanh'(v) = 1 - tanh(v)^2, (H), the linearisation f hands out and vjp reads (at the
 * state f was called on, or any slope the caller keeps fixed). The drive is [U x + b | c], (N).
 * The matrix products are the whole cost; at a few samples each weight row is read once for all
 * samples of a tile and the partial sums stay in registers.
 */
#ifndef LC_REAL
#include "native.h"

/* Keep a loaded vector in a register: otherwise the compiler folds the load into every multiply-add
 * that reads it, and a tile of four samples then issues more loads than the core can. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LC_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define LC_IN_REGISTER(v) ((void)0)
#endif

/* Columns of the zero-padded weight copies: rounded up to 16 serves both precisions. */
int lc_pad(int n) { return (n + 15) / 16 * 16; }

/* Samples per register tile of the products, and B rounded up to a whole number of tiles. */
static int lc_tile(int B) { return B == 1 ? 1 : (B == 2 ? 2 : 4); }
static int lc_rows(int B) { return (B + lc_tile(B) - 1) / lc_tile(B) * lc_tile(B); }

#define LC_SELF "rnn.c"
#include "precisions.h"

#else /* one precision */

/* out[b, j] += sum_h A[b, h] M[h, j] for b < Bp (a multiple of BB) and j < Np (a multiple of two
 * vectors). A tile of BB samples by NV vectors of columns keeps its BB·NV partial sums in
 * registers (GCC/Clang vector extensions: AVX2 registers where the machine has them): eight
 * independent sums hide the latency of the fused multiply-adds. The tile's block of M's columns
 * stays in L1 while the samples pass over it. */
typedef LC_REAL LC_FN(vec) __attribute__((vector_size(32)));
typedef LC_REAL LC_FN(uvec) __attribute__((vector_size(32), aligned(sizeof(LC_REAL))));
#define LC_VL ((int)(32 / sizeof(LC_REAL)))

/* Columns [j0, j1) in tiles of BB samples by NV vectors; returns where it stopped (a full tile no longer fits). */
#define LC_GEMM(BB, NV)                                                                          \
static int LC_FN(gemm_##BB##_##NV)(int Bp, int Kin, int j0, int j1, const LC_REAL *restrict A,    \
                                   int lda, const LC_REAL *restrict M, int ldm,                 \
                                   LC_REAL *restrict out, int ldo)                              \
{                                                                                                \
    for (; j0 + NV * LC_VL <= j1; j0 += NV * LC_VL)                                              \
        for (int b0 = 0; b0 < Bp; b0 += BB) {                                                    \
            LC_FN(vec) acc[BB][NV];                                                              \
            for (int b = 0; b < BB; ++b)                                                         \
                for (int v = 0; v < NV; ++v)                                                     \
                    acc[b][v] = *(const LC_FN(uvec) *)(out + (long)(b0 + b) * ldo + j0 + v * LC_VL); \
            for (int h = 0; h < Kin; ++h) {                                                      \
                const LC_REAL *row = M + (long)h * ldm + j0;                                     \
                LC_FN(vec) w[NV];                                                                \
                for (int v = 0; v < NV; ++v) {                                                   \
                    w[v] = *(const LC_FN(uvec) *)(row + v * LC_VL);                              \
                    LC_IN_REGISTER(w[v]);                                                        \
                }                                                                                \
                for (int b = 0; b < BB; ++b) {                                                   \
                    const LC_FN(vec) a = (LC_FN(vec)){0} + A[(long)(b0 + b) * lda + h];          \
                    for (int v = 0; v < NV; ++v) acc[b][v] += a * w[v];                          \
                }                                                                                \
            }                                                                                    \
            for (int b = 0; b < BB; ++b)                                                         \
                for (int v = 0; v < NV; ++v)                                                     \
                    *(LC_FN(uvec) *)(out + (long)(b0 + b) * ldo + j0 + v * LC_VL) = acc[b][v];   \
        }                                                                                        \
    return j0;                                                                                   \
}
LC_GEMM(1, 8)
LC_GEMM(1, 2)
LC_GEMM(2, 4)
LC_GEMM(2, 2)
LC_GEMM(4, 2)

/* out (Bp, Np) = A (Bp, Kin) M (Kin, Np), Bp = lc_rows(B); rows of A past the B real samples are zero. */
static void LC_FN(gemm)(int Bp, int Kin, int Np, const LC_REAL *A, int lda, const LC_REAL *M, int ldm,
                        LC_REAL *out, int ldo)
{
    memset(out, 0, sizeof(LC_REAL) * (size_t)Bp * ldo);
    const int BB = lc_tile(Bp);
    if (BB == 1) {
        int j = LC_FN(gemm_1_8)(Bp, Kin, 0, Np, A, lda, M, ldm, out, ldo);
        LC_FN(gemm_1_2)(Bp, Kin, j, Np, A, lda, M, ldm, out, ldo);
    } else if (BB == 2) {
        int j = LC_FN(gemm_2_4)(Bp, Kin, 0, Np, A, lda, M, ldm, out, ldo);
        LC_FN(gemm_2_2)(Bp, Kin, j, Np, A, lda, M, ldm, out, ldo);
    } else {
        LC_FN(gemm_4_2)(Bp, Kin, 0, Np, A, lda, M, ldm, out, ldo);
    }
}

/* The network: the lc_system first, then its sizes and zero-padded weight copies. */
typedef struct {
    LC_SYSTEM sys;
    int H, K, Np, Hp;
    const LC_REAL *Ft;   /* (H, Np): [W; D]^T, columns N..Np-1 zero */
    const LC_REAL *Bk;   /* (N, Hp): the way back, [W; D] or the feedback weights, columns H..Hp-1 zero */
} LC_FN(lc_rnn);

/* Scratch of f and vjp on B rows: the left factor of a product (Bp rows, the padded ones zero) and
 * its result. */
static long LC_FN(rnn_work)(const LC_SYSTEM *sys, int B)
{
    const LC_FN(lc_rnn) *net = (const LC_FN(lc_rnn) *)sys;
    const int N = net->H + net->K;
    return (long)lc_rows(B) * (N + (net->Np > net->Hp ? net->Np : net->Hp));
}

/* f = tanh(v) Ft + drive - s; lin = 1 - tanh(v)^2. */
static void LC_FN(rnn_f)(const LC_SYSTEM *sys, int B, const LC_REAL *restrict s, int lds,
                         const LC_REAL *restrict drive, int ldd, LC_REAL *restrict f, int ldf,
                         LC_REAL *restrict lin, int ldl, LC_REAL *restrict work)
{
    const LC_FN(lc_rnn) *net = (const LC_FN(lc_rnn) *)sys;
    const int H = net->H, N = H + net->K, Np = net->Np, Bp = lc_rows(B);
    LC_REAL *r = work, *out = r + (long)Bp * H;
    for (int b = 0; b < B; ++b) {
        const LC_REAL *v = s + (long)b * lds;
        LC_REAL *rb = r + (long)b * H;
        for (int h = 0; h < H; ++h) rb[h] = LC_TANH(v[h]);
        if (lin) {
            LC_REAL *lb = lin + (long)b * ldl;
            for (int h = 0; h < H; ++h) lb[h] = 1 - rb[h] * rb[h];
        }
    }
    memset(r + (long)B * H, 0, sizeof(LC_REAL) * (size_t)(Bp - B) * H);
    LC_FN(gemm)(Bp, H, Np, r, H, net->Ft, Np, out, Np);
    for (int b = 0; b < B; ++b) {
        const LC_REAL *ob = out + (long)b * Np, *db = drive + (long)b * ldd, *sb = s + (long)b * lds;
        LC_REAL *fb = f + (long)b * ldf;
        for (int j = 0; j < N; ++j) fb[j] = ob[j] + db[j] - sb[j];
    }
}

/* out = -a + [lin * (a Bk) | 0]. */
static void LC_FN(rnn_vjp)(const LC_SYSTEM *sys, int B, const LC_REAL *restrict lin, int ldl,
                           const LC_REAL *restrict a, int lda, LC_REAL *restrict out, int ldo,
                           LC_REAL *restrict work)
{
    const LC_FN(lc_rnn) *net = (const LC_FN(lc_rnn) *)sys;
    const int H = net->H, N = H + net->K, Hp = net->Hp, Bp = lc_rows(B);
    LC_REAL *ap = work, *bk = ap + (long)Bp * N;
    for (int b = 0; b < B; ++b) memcpy(ap + (long)b * N, a + (long)b * lda, sizeof(LC_REAL) * N);
    memset(ap + (long)B * N, 0, sizeof(LC_REAL) * (size_t)(Bp - B) * N);
    LC_FN(gemm)(Bp, N, Hp, ap, N, net->Bk, Hp, bk, Hp);
    for (int b = 0; b < B; ++b) {
        const LC_REAL *ab = a + (long)b * lda, *kb = bk + (long)b * Hp, *lb = lin + (long)b * ldl;
        LC_REAL *yb = out + (long)b * ldo;
        for (int h = 0; h < H; ++h) yb[h] = lb[h] * kb[h] - ab[h];
        for (int j = H; j < N; ++j) yb[j] = -ab[j];
    }
}

/* Bytes of an lc_rnn (the caller allocates it). */
size_t LC_FN(lc_rnn_size)(void) { return sizeof(LC_FN(lc_rnn)); }

/* Make net the system of a network with H hidden and K output units: Ft (H, lc_pad(H + K)) and
 * Bk (H + K, lc_pad(H)), zero-padded columns, stay owned by the caller and must outlive net. */
void LC_FN(lc_rnn_init)(LC_FN(lc_rnn) *net, int H, int K, const LC_REAL *Ft, const LC_REAL *Bk)
{
    net->sys.n_state = H + K;
    net->sys.n_out = K;
    net->sys.n_drive = H + K;
    net->sys.n_lin = H;
    net->sys.work = LC_FN(rnn_work);
    net->sys.f = LC_FN(rnn_f);
    net->sys.vjp = LC_FN(rnn_vjp);
    net->H = H;
    net->K = K;
    net->Np = lc_pad(H + K);
    net->Hp = lc_pad(H);
    net->Ft = Ft;
    net->Bk = Bk;
}

#undef LC_VL
#undef LC_GEMM
#endif
