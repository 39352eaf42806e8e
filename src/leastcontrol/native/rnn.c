/* Euler steps of the recurrent network's dynamics for the few samples of a solve's tail
 * (see leastcontrol/native/__init__.py). Three fields, on one flat row per sample:
 *
 * kind 0, LCP's controlled dynamics, z = [v (H) | o (K) | e (H) | u_int (K)], N = H + K:
 *     grad_o = inv_B * dL/do               (softmax(o) - target, or o - target)
 *     psi    = [e | k_i u_int - k_p grad_o]
 *     dz/dt  = [f(s) + psi,  (1 - tanh(v)^2) * (psi Bk) - e,  -(grad_o + alpha u_int)]
 * kind 1, the free dynamics, z = s = [v | o]:   dz/dt = f(s)
 * kind 2, RBP's adjoint dynamics at the free state, z = lambda (N):
 *     dz/dt = -lambda + [slope * (lambda Bk) | 0] + dL
 * with f(s) = tanh(v) Ft + drive - s, Ft = [W; D]^T and Bk = [W; D] (or KP's feedback weights):
 * the fields LCPDI, EquilibriumMethod.free_equilibrium and RBP.adjoint build from torch
 * operations. The matrix products are the whole cost; at a few samples the weight rows are read
 * once for all samples and the partial sums stay in registers.
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

/* Keep a loaded vector in a register: otherwise the compiler folds the load into every multiply-add
 * that reads it, and a tile of four samples then issues more loads than the core can. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define LC_IN_REGISTER(v) __asm__("" : "+x"(v))
#else
#define LC_IN_REGISTER(v) ((void)0)
#endif

/* Columns of the zero-padded weight copies: rounded up to 16 serves both precisions. */
int lc_pad(int n) { return (n + 15) / 16 * 16; }

static int lc_tile(int B) { return B == 1 ? 1 : (B == 2 ? 2 : 4); }

/* Width of a sample's row of the state, and of its two context rows, for each kind. */
static void lc_widths(int kind, int H, int K, int *w, int *c1, int *c2)
{
    const int N = H + K;
    *w = kind == 0 ? 2 * N : N;
    *c1 = kind == 2 ? H : N;            /* drive, or the adjoint's slope */
    *c2 = kind == 0 ? K : (kind == 2 ? N : 0);   /* target, or dL */
}

/* Scratch elements of lc_rnn_steps for B samples. */
long lc_steps_work(int B, int H, int K)
{
    const int N = H + K, Bp = (B + lc_tile(B) - 1) / lc_tile(B) * lc_tile(B);
    return (long)Bp * (H + N + lc_pad(N) + lc_pad(H)) + (long)B * K;
}

/* Scratch elements of lc_rnn_run for B samples: the packed rows, residuals, the steps' scratch
 * and the packed rows' origins (ints, counted as elements). */
long lc_run_work(int kind, int B, int H, int K)
{
    int w, c1, c2;
    lc_widths(kind, H, K, &w, &c1, &c2);
    return (long)B * (w + c1 + c2 + 2) + lc_steps_work(B, H, K);
}

#define LC_CAT2(a, b) a##b
#define LC_CAT(a, b) LC_CAT2(a, b)

#define LC_REAL float
#define LC_SUF _f32
#define LC_TANH tanhf
#define LC_EXP expf
#include "rnn.c"
#undef LC_REAL
#undef LC_SUF
#undef LC_TANH
#undef LC_EXP

#define LC_REAL double
#define LC_SUF _f64
#define LC_TANH tanh
#define LC_EXP exp
#include "rnn.c"

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

/* out (Bp, Np) = A (Bp, Kin) M (Kin, Np); rows of A past the real samples are zero. */
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

/* The relative residual of one sample's step from its sums of squares per group: the largest of
 * the groups' own ratios, or with joint one ratio over the row; NaN where a NaN or Inf showed. */
static LC_REAL LC_FN(residual)(int groups, const LC_REAL *g2, const LC_REAL *z2, int joint, LC_REAL dt)
{
    const LC_REAL tiny = (LC_REAL)1e-30;   /* the solvers' floor under ||z||^2 */
    LC_REAL m = 0, gs = 0, zs = 0;
    for (int q = 0; q < groups; ++q) {
        const LC_REAL v = g2[q] / (z2[q] > tiny ? z2[q] : tiny);
        m = v > m ? v : m;
        gs += g2[q];
        zs += z2[q];
    }
    if (joint) m = gs / (zs > tiny ? zs : tiny);
    const LC_REAL all = gs + zs;
    return all - all != 0 ? (LC_REAL)NAN : dt * (LC_REAL)sqrt((double)m);
}

/* n Euler steps of field `kind` in place on z (B rows of lc_widths' w). c1, c2: the context rows
 * (see the top of the file). Ft: (H, lc_pad(N)) and Bk: (N, lc_pad(H)), zero-padded columns.
 * res (B): each sample's relative residual of the last step, dt ||g|| / ||z|| with z the state the
 * step started from: with joint one ratio over the row, else (kind 0) the largest over the groups
 * (s, e, u_int). work: lc_steps_work(B, H, K) elements. */
void LC_FN(lc_rnn_steps)(int kind, int B, int H, int K, int n, LC_REAL dt, LC_REAL alpha, LC_REAL k_i,
                         LC_REAL k_p, LC_REAL inv_B, int loss, int joint, LC_REAL *restrict z,
                         const LC_REAL *restrict c1, const LC_REAL *restrict c2,
                         const LC_REAL *restrict Ft, const LC_REAL *restrict Bk,
                         LC_REAL *restrict res, LC_REAL *restrict work)
{
    const int N = H + K, Np = lc_pad(N), Hp = lc_pad(H);
    int W, w1, w2;
    lc_widths(kind, H, K, &W, &w1, &w2);
    (void)w2;
    const int Bp = (B + lc_tile(B) - 1) / lc_tile(B) * lc_tile(B);
    /* Rows B..Bp-1 of r and psi stay zero: the padded samples of a tile contribute nothing. */
    LC_REAL *r = work, *psi = r + (long)Bp * H, *f = psi + (long)Bp * N, *bk = f + (long)Bp * Np;
    LC_REAL *go = bk + (long)Bp * Hp;
    memset(r, 0, sizeof(LC_REAL) * (size_t)Bp * (H + N));
    for (int step = 0; step < n; ++step) {
        for (int b = 0; b < B; ++b) {
            const LC_REAL *zb = z + (long)b * W;
            if (kind == 2) {   /* the adjoint's way back reads lambda itself */
                memcpy(psi + (long)b * N, zb, sizeof(LC_REAL) * N);
                continue;
            }
            LC_REAL *rb = r + (long)b * H;
            for (int h = 0; h < H; ++h) rb[h] = LC_TANH(zb[h]);
            if (kind == 1) continue;
            const LC_REAL *o = zb + H, *ui = zb + N + H, *t = c2 + (long)b * K;
            LC_REAL *gb = go + (long)b * K, *pb = psi + (long)b * N;
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
        if (kind != 2) LC_FN(gemm)(Bp, H, Np, r, H, Ft, Np, f, Np);
        if (kind != 1) LC_FN(gemm)(Bp, N, Hp, psi, N, Bk, Hp, bk, Hp);
        for (int b = 0; b < B; ++b) {
            LC_REAL *zb = z + (long)b * W;
            const LC_REAL *fb = f + (long)b * Np, *kb = bk + (long)b * Hp, *rb = r + (long)b * H;
            LC_REAL g2[3] = {0, 0, 0}, z2[3] = {0, 0, 0};
            if (kind == 2) {   /* -lambda + [slope * (lambda Bk) | 0] + dL */
                const LC_REAL *slope = c1 + (long)b * H, *dL = c2 + (long)b * N;
                for (int j = 0; j < N; ++j) {
                    const LC_REAL g = (j < H ? slope[j] * kb[j] : 0) - zb[j] + dL[j];
                    g2[0] += g * g; z2[0] += zb[j] * zb[j]; zb[j] += dt * g;
                }
            } else {
                const LC_REAL *db = c1 + (long)b * N, *pb = psi + (long)b * N;
                for (int j = 0; j < N; ++j) {
                    const LC_REAL g = fb[j] + db[j] - zb[j] + (kind == 0 ? pb[j] : 0);
                    g2[0] += g * g; z2[0] += zb[j] * zb[j]; zb[j] += dt * g;
                }
            }
            if (kind == 0) {
                const LC_REAL *gb = go + (long)b * K;
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
            }
            if (step == n - 1) res[b] = LC_FN(residual)(kind == 0 ? 3 : 1, g2, z2, joint, dt);
        }
    }
}

/* Solve the m x m system A w = rhs in place by Gaussian elimination with partial pivoting; returns
 * 0, or 1 where a pivot is exactly zero (LAPACK's info > 0). */
static int LC_FN(solve_small)(int m, double *A, double *rhs)
{
    for (int c = 0; c < m; ++c) {
        int p = c;
        for (int r = c + 1; r < m; ++r) if (fabs(A[r * m + c]) > fabs(A[p * m + c])) p = r;
        if (A[p * m + c] == 0) return 1;
        if (p != c) {
            for (int k = 0; k < m; ++k) { double t = A[c * m + k]; A[c * m + k] = A[p * m + k]; A[p * m + k] = t; }
            double t = rhs[c]; rhs[c] = rhs[p]; rhs[p] = t;
        }
        for (int r = c + 1; r < m; ++r) {
            const double f = A[r * m + c] / A[c * m + c];
            for (int k = c; k < m; ++k) A[r * m + k] -= f * A[c * m + k];
            rhs[r] -= f * rhs[c];
        }
    }
    for (int c = m - 1; c >= 0; --c) {
        double v = rhs[c];
        for (int k = c + 1; k < m; ++k) v -= A[c * m + k] * rhs[k];
        rhs[c] = v / A[c * m + c];
    }
    return 0;
}

/* The check-level Anderson mix of one sample, as leastcontrol.solvers._check_mix computes it: the
 * run start -> end (row of W, residual res at the check) joins the sample's memory (F: the ends of
 * its last m runs; G, float64: their residuals end - start; P: their inner products per group;
 * valid; best and best_z; left: returns to the best point left, -1: mixing stopped), and the row
 * end is replaced by where the sample goes on from: the mix of the stored ends whose weights
 * minimise the norm of the mixed residual (each group weighed by 1/||end_g||^2), or its best
 * point after a jump past restart times its best residual. scratch: W + m (m + groups + 1) doubles. */
static void LC_FN(mix)(int W, int m, int groups, const int *widths, double reg, double restart,
                       const LC_REAL *start, LC_REAL *end, double res, LC_REAL *F, double *G, double *P,
                       int *valid, double *best, LC_REAL *best_z, long long *left, double *scratch)
{
    const double tiny = 1e-30;
    double *g = scratch, *gram = g + W, *w = gram + m * m, *row = w + m;
    const int blown = res > restart * *best && *left >= 0;
    const int back = blown && *left > 0;
    if (blown) *left -= 1;
    if (res < *best) { *best = res; memcpy(best_z, end, sizeof(LC_REAL) * W); }
    for (int j = 0; j < W; ++j) g[j] = (double)(LC_REAL)(end[j] - start[j]);
    /* the new run replaces the oldest: shift the slots down, the run goes last */
    memmove(F, F + W, sizeof(LC_REAL) * (size_t)(m - 1) * W);
    memcpy(F + (long)(m - 1) * W, end, sizeof(LC_REAL) * W);
    memmove(G, G + W, sizeof(double) * (size_t)(m - 1) * W);
    memcpy(G + (long)(m - 1) * W, g, sizeof(double) * W);
    memmove(valid, valid + 1, sizeof(int) * (m - 1));
    valid[m - 1] = 1;
    for (int q = 0, c0 = 0; q < groups; c0 += widths[q], ++q) {
        for (int j = 0; j < m; ++j) {
            double d = 0;
            for (int c = c0; c < c0 + widths[q]; ++c) d += G[(long)j * W + c] * g[c];
            row[q * m + j] = d;
        }
        double *Pq = P + (long)q * m * m;
        for (int i = 0; i < m - 1; ++i)
            for (int j = 0; j < m - 1; ++j) Pq[i * m + j] = Pq[(i + 1) * m + j + 1];
        for (int j = 0; j < m; ++j) Pq[(m - 1) * m + j] = Pq[j * m + m - 1] = row[q * m + j];
    }
    for (int k = 0; k < m * m; ++k) gram[k] = 0;
    for (int q = 0, c0 = 0; q < groups; c0 += widths[q], ++q) {
        double e2 = 0;
        for (int c = c0; c < c0 + widths[q]; ++c) e2 += (double)(LC_REAL)(end[c] * end[c]);
        const double inv = 1.0 / (e2 > tiny ? e2 : tiny);
        for (int k = 0; k < m * m; ++k) gram[k] += P[(long)q * m * m + k] * inv;
    }
    /* mixing weights: min ||sum a_j G_j|| with sum a_j = 1 over the valid slots, Tikhonov reg */
    int count = 0;
    double diag = 0;
    for (int i = 0; i < m; ++i)
        for (int j = 0; j < m; ++j) if (!(valid[i] && valid[j])) gram[i * m + j] = 0;
    for (int i = 0; i < m; ++i) { count += valid[i]; diag += gram[i * m + i]; }
    double scale = diag / (count > 1 ? count : 1);
    scale = scale > tiny ? scale : tiny;
    for (int i = 0; i < m; ++i) { gram[i * m + i] += valid[i] ? reg * scale : 1.0; w[i] = valid[i]; }
    int ok = LC_FN(solve_small)(m, gram, w) == 0;
    double wsum = 0;
    for (int i = 0; i < m; ++i) wsum += w[i];
    ok = ok && fabs(wsum) > tiny;
    for (int i = 0; i < m && ok; ++i) { w[i] /= wsum; ok = isfinite(w[i]); }
    if (ok && *left >= 0) {   /* the mixed point, summed in the state's precision */
        for (int c = 0; c < W; ++c) {
            LC_REAL v = 0;
            for (int j = 0; j < m; ++j) v += (LC_REAL)w[j] * F[(long)j * W + c];
            end[c] = v;
        }
    }
    for (int i = 0; i < m; ++i) valid[i] = valid[i] && !blown && *left >= 0;
    if (back) memcpy(end, best_z, sizeof(LC_REAL) * W);
}

/* Euler's loop over the samples of a solve's tail, convergence checks included, so that the tail
 * costs one call: runs of steps to each check (every check_every steps, and at max_iter) and, at
 * each check, the stopping rule of leastcontrol.solvers._Freezer.check: a sample stops when its
 * residual is below tol or, with patience > 0, when it has not fallen below stall_ratio times its
 * marked residual for patience steps and is below stall_tol. A stopped sample keeps the state of
 * that check; the others go on. Each sample's arithmetic is the same whichever samples run beside it.
 *
 * All B rows run on entry. In/out: z, mark_res and mark_step (the stall rule's marks, per sample),
 * *step (where the run starts; where it ended). Out, per sample: res (the residual at its last
 * check), stop_step (the step of that check), stopped (1 if it stopped, 0 if it reached max_iter).
 * trace: the largest residual over the running samples at each check, at most trace_cap of them,
 * *n_trace written. work: lc_run_work(kind, B, H, K) elements.
 * Returns 0; 1 if a residual was not finite (the run ends at that check, the samples still running
 * hold its state). */
int LC_FN(lc_rnn_run)(int kind, int B, int H, int K, LC_REAL dt, LC_REAL alpha, LC_REAL k_i, LC_REAL k_p,
                      LC_REAL inv_B, int loss, int joint, int *step, int check_every, int max_iter,
                      double tol, int patience, double stall_tol, double stall_ratio,
                      LC_REAL *restrict z, const LC_REAL *restrict c1, const LC_REAL *restrict c2,
                      const LC_REAL *restrict Ft, const LC_REAL *restrict Bk, double *restrict res,
                      double *restrict mark_res, double *restrict mark_step, double *restrict stop_step,
                      int *restrict stopped, double *restrict trace, int trace_cap, int *n_trace,
                      LC_REAL *restrict work, int m, int mix_after, double reg, double restart,
                      LC_REAL *mF, double *mG, double *mP, int *mvalid, double *mbest, LC_REAL *mbest_z,
                      long long *mleft, double *mix_scratch)
{
    int W, w1, w2;
    lc_widths(kind, H, K, &W, &w1, &w2);
    /* The running samples, packed in front: their rows of z and the context, and where they came from. */
    LC_REAL *zw = work, *aw = zw + (long)B * W, *bw = aw + (long)B * w1, *rw = bw + (long)B * w2;
    LC_REAL *steps_work = rw + B;
    int *from = (int *)(steps_work + lc_steps_work(B, H, K));
    /* With the mix: each run's start, and the groups the mix weighs (as the residual's). */
    LC_REAL *zs = mix_scratch ? (LC_REAL *)(mix_scratch + W + m * (m + 4)) : 0;
    const int groups = kind == 0 && !joint ? 3 : 1;
    const int widths[3] = {groups == 3 ? H + K : W, H, K};
    memcpy(zw, z, sizeof(LC_REAL) * (size_t)B * W);
    memcpy(aw, c1, sizeof(LC_REAL) * (size_t)B * w1);
    if (w2) memcpy(bw, c2, sizeof(LC_REAL) * (size_t)B * w2);
    for (int b = 0; b < B; ++b) { from[b] = b; stopped[b] = 0; }
    int running = B, status = 0;
    *n_trace = 0;
    while (*step < max_iter && running > 0) {
        const int to_check = check_every - *step % check_every, to_end = max_iter - *step;
        const int n = to_check < to_end ? to_check : to_end;
        const int mixing = m > 0 && mix_after <= *step + n && *step + n < max_iter;
        if (mixing) memcpy(zs, zw, sizeof(LC_REAL) * (size_t)running * W);
        LC_FN(lc_rnn_steps)(kind, running, H, K, n, dt, alpha, k_i, k_p, inv_B, loss, joint, zw, aw, bw, Ft, Bk,
                            rw, steps_work);
        *step += n;
        double worst = 0;
        for (int a = 0; a < running; ++a) {
            const double r = rw[a];
            if (r != r) status = 1;
            worst = r > worst ? r : worst;
        }
        if (*n_trace < trace_cap) trace[(*n_trace)++] = status ? (double)NAN : worst;
        int kept = 0;
        for (int a = 0; a < running; ++a) {
            const int b = from[a];
            const double r = rw[a];
            int done = r < tol;
            if (patience > 0) {
                if (r < stall_ratio * mark_res[b]) { mark_res[b] = r; mark_step[b] = *step; }
                done |= (*step - mark_step[b] >= patience) && r < stall_tol;
            }
            res[b] = r;
            stop_step[b] = *step;
            if (done || status) {
                memcpy(z + (long)b * W, zw + (long)a * W, sizeof(LC_REAL) * W);
                stopped[b] = done && !status;
                continue;
            }
            if (mixing)   /* where the sample goes on from */
                LC_FN(mix)(W, m, groups, widths, reg, restart, zs + (long)a * W, zw + (long)a * W, r,
                           mF + (long)b * m * W, mG + (long)b * m * W, mP + (long)b * groups * m * m,
                           mvalid + (long)b * m, mbest + b, mbest_z + (long)b * W, mleft + b, mix_scratch);
            if (kept != a) {   /* pack the samples that go on in front */
                memmove(zw + (long)kept * W, zw + (long)a * W, sizeof(LC_REAL) * W);
                memmove(aw + (long)kept * w1, aw + (long)a * w1, sizeof(LC_REAL) * w1);
                if (w2) memmove(bw + (long)kept * w2, bw + (long)a * w2, sizeof(LC_REAL) * w2);
                from[kept] = b;
            }
            ++kept;
        }
        running = status ? 0 : kept;
    }
    for (int a = 0; a < running; ++a)   /* reached max_iter */
        memcpy(z + (long)from[a] * W, zw + (long)a * W, sizeof(LC_REAL) * W);
    return status;
}

#undef LC_FN
#undef LC_VL
#undef LC_GEMM
#endif
