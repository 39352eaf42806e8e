/* Euler steps of any field (native.h's lc_field): the one loop the C steps run. It takes the steps
 * between two convergence checks of the solver driver and nothing else; the stopping rule, freezing
 * and mixing stay in leastcontrol.solvers. */
#ifndef LC_REAL
#include "native.h"

#define LC_SELF "euler.c"
#include "precisions.h"

#else /* one precision */

/* Scratch elements of lc_euler on B rows: g, then the field's own. */
long LC_FN(lc_euler_work)(const LC_FIELD *field, int B)
{
    return (long)B * field->width + field->work(field, B);
}

/* n >= 1 steps z <- z + dt g(z) in place on the B rows z (B, width). res[b]: the relative residual
 * of the last step, dt ||g|| / ||z_{n-1}|| with z_{n-1} the row that step started from: over the
 * `groups` column groups of widths[0..groups-1] (summing to width) the largest of the groups' own
 * ratios, each ||z_q||^2 floored at 1e-30 (with one group, the ratio over the row); NaN where a
 * sum of squares is not finite. work: lc_euler_work(field, B) elements. */
void LC_FN(lc_euler)(const LC_FIELD *field, int B, int n, LC_REAL dt, LC_REAL *restrict z, int groups,
                     const int *widths, LC_REAL *restrict res, LC_REAL *restrict work)
{
    const int W = field->width;
    const LC_REAL tiny = (LC_REAL)1e-30;
    LC_REAL *restrict g = work;
    for (int step = 0; step < n - 1; ++step) {
        field->g(field, B, z, g, work + (long)B * W);
        for (long i = 0; i < (long)B * W; ++i) z[i] += dt * g[i];
    }
    field->g(field, B, z, g, work + (long)B * W);
    for (int b = 0; b < B; ++b) {
        LC_REAL *zb = z + (long)b * W;
        const LC_REAL *gb = g + (long)b * W;
        LC_REAL worst = 0, all = 0;
        for (int q = 0, c = 0; q < groups; c += widths[q], ++q) {
            LC_REAL g2 = 0, z2 = 0;
            for (int j = c; j < c + widths[q]; ++j) {
                g2 += gb[j] * gb[j];
                z2 += zb[j] * zb[j];
                zb[j] += dt * gb[j];
            }
            const LC_REAL ratio = g2 / (z2 > tiny ? z2 : tiny);
            worst = ratio > worst ? ratio : worst;
            all += g2 + z2;
        }
        res[b] = all - all != 0 ? (LC_REAL)NAN : dt * (LC_REAL)sqrt((double)worst);
    }
}

#endif
