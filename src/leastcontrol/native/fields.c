/* The learning rules' dynamics, written against any system's lc_system (native.h), and their entry
 * points: each builds its field on the caller's rows and runs n Euler steps of it (euler.c). With
 * f and (d_s f)^T the system's, N = n_state, K = n_out, E = N - K (the populations before the output):
 *
 * free (every method's first phase), z = s, (N):
 *     dz/dt = f(s)                                                  context: drive
 * adjoint (RBP), z = lambda, (N), at a fixed linearisation lin (the free state's):
 *     dz/dt = (d_s f)^T lambda + dL                                 context: lin, dL (N)
 * controlled (LCP-DI, and KP where the system's way back holds the feedback weights),
 * z = [s (N) | e (E) | u_int (K)], (2N):
 *     grad_o = inv_B * dL/do          cross-entropy: softmax(o) - target; mse: o - target (K)
 *     psi    = [e | k_i u_int - k_p grad_o]                          (N)
 *     dz/dt  = [f(s) + psi,  ((d_s f)^T psi)_{:E},  -(grad_o + alpha u_int)]
 *                                                                   context: drive, target (K)
 * with o the last K columns of s and (d_s f)^T taken at s.
 *
 * Every entry point: n >= 1 steps of size dt in place on z (B rows), and res[b] the relative
 * residual of the last step, dt ||g|| / ||z_{n-1}|| per group (euler.c); work holds
 * lc_<field>_work(sys, B) elements. Context rows are contiguous, one per row of z.
 */
#ifndef LC_REAL
#include "native.h"

enum { LC_CROSS_ENTROPY = 0, LC_MSE = 1 };

#define LC_SELF "fields.c"
#include "precisions.h"

#else /* one precision */

/* The dimensions of a system, for the caller to size rows: n_state, n_out, n_drive, n_lin. */
void LC_FN(lc_system_dims)(const LC_SYSTEM *sys, int *dims)
{
    dims[0] = sys->n_state;
    dims[1] = sys->n_out;
    dims[2] = sys->n_drive;
    dims[3] = sys->n_lin;
}

/* Every field starts with its LC_FIELD and its system; a field whose scratch is its system's alone
 * reads it through this common start. */
typedef struct {
    LC_FIELD field;
    const LC_SYSTEM *sys;
} LC_FN(on_system);

static long LC_FN(system_work)(const LC_FIELD *field, int B)
{
    const LC_SYSTEM *sys = ((const LC_FN(on_system) *)field)->sys;
    return sys->work(sys, B);
}

/* ---- free: dz/dt = f(z) ---- */

typedef struct {
    LC_FIELD field;
    const LC_SYSTEM *sys;
    const LC_REAL *drive;
} LC_FN(free_field);

static void LC_FN(free_g)(const LC_FIELD *field, int B, const LC_REAL *z, LC_REAL *g, LC_REAL *work)
{
    const LC_FN(free_field) *ff = (const LC_FN(free_field) *)field;
    const LC_SYSTEM *sys = ff->sys;
    sys->f(sys, B, z, sys->n_state, ff->drive, sys->n_drive, g, sys->n_state, 0, 0, work);
}

static LC_FN(free_field) LC_FN(free_make)(const LC_SYSTEM *sys, const LC_REAL *drive)
{
    LC_FN(free_field) ff = {{sys->n_state, LC_FN(system_work), LC_FN(free_g)}, sys, drive};
    return ff;
}

long LC_FN(lc_free_work)(const LC_SYSTEM *sys, int B)
{
    LC_FN(free_field) ff = LC_FN(free_make)(sys, 0);
    return LC_FN(lc_euler_work)(&ff.field, B);
}

void LC_FN(lc_free_steps)(const LC_SYSTEM *sys, int B, int n, LC_REAL dt, LC_REAL *z, const LC_REAL *drive,
                          int groups, const int *widths, LC_REAL *res, LC_REAL *work)
{
    LC_FN(free_field) ff = LC_FN(free_make)(sys, drive);
    LC_FN(lc_euler)(&ff.field, B, n, dt, z, groups, widths, res, work);
}

/* ---- adjoint: dz/dt = (d_s f)^T z + dL at the fixed linearisation lin ---- */

typedef struct {
    LC_FIELD field;
    const LC_SYSTEM *sys;
    const LC_REAL *lin, *dL;
} LC_FN(adjoint_field);

static void LC_FN(adjoint_g)(const LC_FIELD *field, int B, const LC_REAL *z, LC_REAL *g, LC_REAL *work)
{
    const LC_FN(adjoint_field) *af = (const LC_FN(adjoint_field) *)field;
    const LC_SYSTEM *sys = af->sys;
    const int N = sys->n_state;
    sys->vjp(sys, B, af->lin, sys->n_lin, z, N, g, N, work);
    for (int b = 0; b < B; ++b) {
        LC_REAL *gb = g + (long)b * N;
        const LC_REAL *db = af->dL + (long)b * N;
        for (int j = 0; j < N; ++j) gb[j] += db[j];
    }
}

static LC_FN(adjoint_field) LC_FN(adjoint_make)(const LC_SYSTEM *sys, const LC_REAL *lin, const LC_REAL *dL)
{
    LC_FN(adjoint_field) af = {{sys->n_state, LC_FN(system_work), LC_FN(adjoint_g)}, sys, lin, dL};
    return af;
}

long LC_FN(lc_adjoint_work)(const LC_SYSTEM *sys, int B)
{
    LC_FN(adjoint_field) af = LC_FN(adjoint_make)(sys, 0, 0);
    return LC_FN(lc_euler_work)(&af.field, B);
}

void LC_FN(lc_adjoint_steps)(const LC_SYSTEM *sys, int B, int n, LC_REAL dt, LC_REAL *z, const LC_REAL *lin,
                             const LC_REAL *dL, int groups, const int *widths, LC_REAL *res, LC_REAL *work)
{
    LC_FN(adjoint_field) af = LC_FN(adjoint_make)(sys, lin, dL);
    LC_FN(lc_euler)(&af.field, B, n, dt, z, groups, widths, res, work);
}

/* ---- controlled: LCP's dynamics with the output controller and the hidden control e ---- */

typedef struct {
    LC_FIELD field;
    const LC_SYSTEM *sys;
    const LC_REAL *drive, *target;
    int loss;
    LC_REAL alpha, k_i, k_p, inv_B;
} LC_FN(controlled_field);

/* g's scratch: psi (B, N), grad_o (B, K), lin (B, n_lin), (d_s f)^T psi (B, N), then the system's. */
static long LC_FN(controlled_work)(const LC_FIELD *field, int B)
{
    const LC_SYSTEM *sys = ((const LC_FN(controlled_field) *)field)->sys;
    return (long)B * (2 * sys->n_state + sys->n_out + sys->n_lin) + sys->work(sys, B);
}

static void LC_FN(controlled_g)(const LC_FIELD *field, int B, const LC_REAL *z, LC_REAL *g, LC_REAL *work)
{
    const LC_FN(controlled_field) *cf = (const LC_FN(controlled_field) *)field;
    const LC_SYSTEM *sys = cf->sys;
    const int N = sys->n_state, K = sys->n_out, E = N - K, L = sys->n_lin, W = 2 * N;
    const LC_REAL k_i = cf->k_i, k_p = cf->k_p, inv_B = cf->inv_B, alpha = cf->alpha;
    LC_REAL *psi = work, *go = psi + (long)B * N, *lin = go + (long)B * K, *back = lin + (long)B * L;
    LC_REAL *sys_work = back + (long)B * N;
    for (int b = 0; b < B; ++b) {
        const LC_REAL *zb = z + (long)b * W, *o = zb + E, *ui = zb + N + E, *t = cf->target + (long)b * K;
        LC_REAL *gb = go + (long)b * K, *pb = psi + (long)b * N;
        if (cf->loss == LC_CROSS_ENTROPY) {
            LC_REAL m = o[0], sum = 0;
            for (int k = 1; k < K; ++k) m = o[k] > m ? o[k] : m;
            for (int k = 0; k < K; ++k) { gb[k] = LC_EXP(o[k] - m); sum += gb[k]; }
            for (int k = 0; k < K; ++k) gb[k] = (gb[k] / sum - t[k]) * inv_B;
        } else {
            for (int k = 0; k < K; ++k) gb[k] = (o[k] - t[k]) * inv_B;
        }
        memcpy(pb, zb + N, sizeof(LC_REAL) * E);
        for (int k = 0; k < K; ++k) pb[E + k] = k_i * ui[k] - k_p * gb[k];
    }
    sys->f(sys, B, z, W, cf->drive, sys->n_drive, g, W, lin, L, sys_work);
    sys->vjp(sys, B, lin, L, psi, N, back, N, sys_work);
    for (int b = 0; b < B; ++b) {
        const LC_REAL *pb = psi + (long)b * N, *kb = back + (long)b * N, *gob = go + (long)b * K;
        const LC_REAL *ui = z + (long)b * W + N + E;
        LC_REAL *gb = g + (long)b * W;
        for (int j = 0; j < N; ++j) gb[j] += pb[j];
        memcpy(gb + N, kb, sizeof(LC_REAL) * E);
        for (int k = 0; k < K; ++k) gb[N + E + k] = -(gob[k] + alpha * ui[k]);
    }
}

static LC_FN(controlled_field) LC_FN(controlled_make)(const LC_SYSTEM *sys, const LC_REAL *drive,
                                                      const LC_REAL *target, int loss, LC_REAL alpha,
                                                      LC_REAL k_i, LC_REAL k_p, LC_REAL inv_B)
{
    LC_FN(controlled_field) cf = {{2 * sys->n_state, LC_FN(controlled_work), LC_FN(controlled_g)},
                                  sys, drive, target, loss, alpha, k_i, k_p, inv_B};
    return cf;
}

long LC_FN(lc_controlled_work)(const LC_SYSTEM *sys, int B)
{
    LC_FN(controlled_field) cf = LC_FN(controlled_make)(sys, 0, 0, 0, 0, 0, 0, 0);
    return LC_FN(lc_euler_work)(&cf.field, B);
}

/* loss: 0 cross-entropy, 1 mse. */
void LC_FN(lc_controlled_steps)(const LC_SYSTEM *sys, int B, int n, LC_REAL dt, LC_REAL *z, const LC_REAL *drive,
                                const LC_REAL *target, int loss, LC_REAL alpha, LC_REAL k_i, LC_REAL k_p,
                                LC_REAL inv_B, int groups, const int *widths, LC_REAL *res, LC_REAL *work)
{
    LC_FN(controlled_field) cf = LC_FN(controlled_make)(sys, drive, target, loss, alpha, k_i, k_p, inv_B);
    LC_FN(lc_euler)(&cf.field, B, n, dt, z, groups, widths, res, work);
}

#endif
