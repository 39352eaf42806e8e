/* Euler steps of the LCP controlled dynamics of the recurrent network, for the few samples of a
 * solve's tail (see leastcontrol/native/__init__.py).
 *
 * State of one sample, one flat row z = [v (H) | o (K) | e (H) | u_int (K)], N = H + K:
 *     grad_o = inv_B * dL/do               (softmax(o) - target, or o - target)
 *     psi    = [e | k_i u_int - k_p grad_o]
 *     f      = tanh(v) Ft + drive - s      (s = [v | o], Ft = [W; D]^T)
 *     bk     = psi Bk                      (Bk = [W; D], or the feedback pathway)
 *     dz/dt  = [f + psi,  (1 - tanh(v)^2) * bk - e,  -(grad_o + alpha u_int)]
 * the same field as LCPDI.controlled_equilibrium builds from torch operations. The two products
 * are the whole cost; at a few samples the weight rows are read once for all samples and the
 * partial sums stay in registers.
 *
 * The file is compiled twice, for float and double, by including itself (its folder is on the
 * include path). */
#ifndef LC_REAL
#include <math.h>
#include <string.h>

/* glibc >= 2.35 ships vector tanhf/expf (libmvec); declaring them lets the compiler vectorise the
 * rate and softmax loops without -ffast-math (which would also allow it to reorder sums). */
#if defined(__x86_64__) && defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
float tanhf(float) __attribute__((simd("notinbranch")));
float expf(float) __attribute__((simd("notinbranch")));
double tanh(double) __attribute__((simd("notinbranch")));
double exp(double) __attribute__((simd("notinbranch")));
#endif

/* Columns of the zero-padded weight copies: N rounded up to 16 serves both precisions. */
int lc_pad(int n) { return (n + 15) / 16 * 16; }

/* Scratch elements one call needs for B samples (the caller allocates them). */
long lc_work_size(int B, int H, int K)
{
    const int N = H + K, BB = B == 1 ? 1 : (B == 2 ? 2 : 4), Bp = (B + BB - 1) / BB * BB;
    return (long)Bp * (H + N + lc_pad(N) + lc_pad(H)) + (long)B * K;
}

/* Keep a loaded vector in a register: otherwise the compiler folds the load into every multiply-add
 * that reads it, and a tile of four samples then issues more loads than the core can. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LC_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define LC_IN_REGISTER(v) ((void)0)
#endif

#define LC_CAT2(a, b) a##b
#define LC_CAT(a, b) LC_CAT2(a, b)

#define LC_REAL float
#define LC_SUF _f32
#define LC_TANH tanhf
#define LC_EXP expf
#include "rnn_lcp.c"
#undef LC_REAL
#undef LC_SUF
#undef LC_TANH
#undef LC_EXP

#define LC_REAL double
#define LC_SUF _f64
#define LC_TANH tanh
#define LC_EXP exp
#include "rnn_lcp.c"

#else /* one precision */

#define LC_FN(name) LC_CAT(name, LC_SUF)

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

static void LC_FN(gemm)(int BB, int Bp, int Kin, int Np, const LC_REAL *A, int lda,
                        const LC_REAL *M, int ldm, LC_REAL *out, int ldo)
{
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

/* n steps in place on z (B, 2N). Ft: (H, lc_pad(N)) and Bk: (N, lc_pad(H)), zero-padded
 * columns. res (B) receives each sample's relative residual of the last step, dt ||g|| / ||z||
 * with z the state the step started from: the largest over the groups (s, e, u_int), or with
 * joint one over the whole row; NaN where the step produced a NaN or Inf. work:
 * lc_work_size(B, H, K) elements. */
void LC_FN(lc_rnn_lcp_steps)(int B, int H, int K, int n, LC_REAL dt, LC_REAL alpha, LC_REAL k_i,
                             LC_REAL k_p, LC_REAL inv_B, int loss, int joint, LC_REAL *restrict z,
                             const LC_REAL *restrict drive, const LC_REAL *restrict target,
                             const LC_REAL *restrict Ft, const LC_REAL *restrict Bk,
                             LC_REAL *restrict res, LC_REAL *restrict work)
{
    const int N = H + K, W2 = 2 * N, Np = lc_pad(N), Hp = lc_pad(H);
    const int BB = B == 1 ? 1 : (B == 2 ? 2 : 4), Bp = (B + BB - 1) / BB * BB;
    /* Rows B..Bp-1 of r and psi stay zero: the padded samples of a block contribute nothing. */
    LC_REAL *r = work, *psi = r + (long)Bp * H, *f = psi + (long)Bp * N, *bk = f + (long)Bp * Np;
    LC_REAL *go = bk + (long)Bp * Hp;
    memset(r, 0, sizeof(LC_REAL) * (size_t)Bp * (H + N));
    for (int step = 0; step < n; ++step) {
        for (int b = 0; b < B; ++b) {
            const LC_REAL *zb = z + (long)b * W2, *o = zb + H, *ui = zb + N + H, *t = target + (long)b * K;
            LC_REAL *rb = r + (long)b * H, *gb = go + (long)b * K, *pb = psi + (long)b * N;
            for (int h = 0; h < H; ++h) rb[h] = LC_TANH(zb[h]);
            if (loss == 0) {
                LC_REAL m = o[0], s = 0;
                for (int k = 1; k < K; ++k) m = o[k] > m ? o[k] : m;
                for (int k = 0; k < K; ++k) { gb[k] = LC_EXP(o[k] - m); s += gb[k]; }
                for (int k = 0; k < K; ++k) gb[k] = (gb[k] / s - t[k]) * inv_B;
            } else {
                for (int k = 0; k < K; ++k) gb[k] = (o[k] - t[k]) * inv_B;
            }
            memcpy(pb, zb + N, sizeof(LC_REAL) * H);
            for (int k = 0; k < K; ++k) pb[H + k] = k_i * ui[k] - k_p * gb[k];
        }
        memset(f, 0, sizeof(LC_REAL) * (size_t)Bp * (Np + Hp));
        LC_FN(gemm)(BB, Bp, H, Np, r, H, Ft, Np, f, Np);
        LC_FN(gemm)(BB, Bp, N, Hp, psi, N, Bk, Hp, bk, Hp);
        for (int b = 0; b < B; ++b) {
            LC_REAL *zb = z + (long)b * W2;
            const LC_REAL *fb = f + (long)b * Np, *pb = psi + (long)b * N, *db = drive + (long)b * N;
            const LC_REAL *rb = r + (long)b * H, *kb = bk + (long)b * Hp, *gb = go + (long)b * K;
            LC_REAL g2[3] = {0, 0, 0}, z2[3] = {0, 0, 0};
            for (int j = 0; j < N; ++j) {
                const LC_REAL g = fb[j] + db[j] - zb[j] + pb[j];
                g2[0] += g * g; z2[0] += zb[j] * zb[j]; zb[j] += dt * g;
            }
            for (int h = 0; h < H; ++h) {
                LC_REAL *e = zb + N + h;
                const LC_REAL g = (1 - rb[h] * rb[h]) * kb[h] - *e;
                g2[1] += g * g; z2[1] += *e * *e; *e += dt * g;
            }
            for (int k = 0; k < K; ++k) {
                LC_REAL *u = zb + N + H + k;
                const LC_REAL g = -(gb[k] + alpha * *u);
                g2[2] += g * g; z2[2] += *u * *u; *u += dt * g;
            }
            if (step == n - 1) {
                const LC_REAL tiny = (LC_REAL)1e-30;   /* the solvers' floor under ||z||^2 */
                LC_REAL m = 0;
                if (joint) {
                    const LC_REAL zz = z2[0] + z2[1] + z2[2];
                    m = (g2[0] + g2[1] + g2[2]) / (zz > tiny ? zz : tiny);
                } else {
                    for (int q = 0; q < 3; ++q) {
                        const LC_REAL v = g2[q] / (z2[q] > tiny ? z2[q] : tiny);
                        m = v > m ? v : m;
                    }
                }
                const LC_REAL all = g2[0] + g2[1] + g2[2] + z2[0] + z2[1] + z2[2];
                res[b] = all - all != 0 ? (LC_REAL)NAN : dt * sqrt(m);   /* NaN or Inf anywhere: NaN */
            }
        }
    }
}

#undef LC_FN
#undef LC_VL
#undef LC_GEMM
#endif
