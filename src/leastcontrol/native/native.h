/* The interface between a system's C kernels and the fields written on them (leastcontrol.native).
 *
 * Three layers, one shared library:
 *   a system (rnn.c)      its dynamics f(s) and state VJP (d_s f)^T a, behind an lc_system;
 *   the fields (fields.c) the learning rules' dynamics, written against any lc_system;
 *   the runner (euler.c)  n Euler steps of any lc_field and the residual of the last one.
 *
 * Rows are samples. A flat state s of a system is one row of n_state values whose last n_out
 * columns are the output population (the one a loss reads). Every kernel exists once per
 * precision: this header and each source file are compiled for float (suffix _f32) and double
 * (_f64) by including themselves through precisions.h, so lc_system below is lc_system_f32 and
 * lc_system_f64, LC_REAL float and double.
 */
#ifndef LC_NATIVE_H
#define LC_NATIVE_H

#include <math.h>
#include <stddef.h>
#include <string.h>

/* glibc >= 2.35 ships vector tanhf/expf (libmvec); declaring them lets the compiler vectorise the
 * rate and softmax loops without -ffast-math (which would also allow it to reorder sums). */
#if defined(__x86_64__) && defined(__GLIBC__) && (__GLIBC__ > 2 || (__GLIBC__ == 2 && __GLIBC_MINOR__ >= 35))
float tanhf(float) __attribute__((simd("notinbranch")));
float expf(float) __attribute__((simd("notinbranch")));
double tanh(double) __attribute__((simd("notinbranch")));
double exp(double) __attribute__((simd("notinbranch")));
#endif

#define LC_CAT2(a, b) a##b
#define LC_CAT(a, b) LC_CAT2(a, b)
/* name_f32 or name_f64, in the precision being compiled */
#define LC_FN(name) LC_CAT(name, LC_SUF)
#define LC_SYSTEM LC_FN(lc_system)
#define LC_FIELD LC_FN(lc_field)

#define LC_SELF "native.h"
#include "precisions.h"

#elif defined(LC_REAL) /* the interface in one precision */

typedef struct LC_SYSTEM LC_SYSTEM;

/* A system's kernels. Every call works on B rows; ld* are row strides in elements. */
struct LC_SYSTEM {
    int n_state;   /* N: width of a state row s */
    int n_out;     /* K: the output population, the last K columns of s */
    int n_drive;   /* width of a row of the drive (the input's share of f) */
    int n_lin;     /* width of a row of the linearisation: what (d_s f)^T needs of a state */
    /* Scratch elements one call of f or vjp needs on B rows. */
    long (*work)(const LC_SYSTEM *sys, int B);
    /* f[b] = f(s[b]; drive[b]), (B, N). If lin is not NULL, lin[b] (B, n_lin) is the linearisation
     * at s[b], the one vjp reads. f may not alias s. */
    void (*f)(const LC_SYSTEM *sys, int B, const LC_REAL *s, int lds, const LC_REAL *drive, int ldd,
              LC_REAL *f, int ldf, LC_REAL *lin, int ldl, LC_REAL *work);
    /* out[b] = (d_s f)^T a[b] at the linearisation lin[b], (B, N). out may not alias a. */
    void (*vjp)(const LC_SYSTEM *sys, int B, const LC_REAL *lin, int ldl, const LC_REAL *a, int lda,
                LC_REAL *out, int ldo, LC_REAL *work);
};

typedef struct LC_FIELD LC_FIELD;

/* A vector field dz/dt = g(z) on rows of `width` values: what the Euler runner steps. A concrete
 * field starts with this struct and keeps its system, context rows and constants after it. */
struct LC_FIELD {
    int width;
    /* Scratch elements one call of g needs on B rows. */
    long (*work)(const LC_FIELD *field, int B);
    /* g[b] = g(z[b]) for the B rows z (B, width), both with row stride width; g may not alias z. */
    void (*g)(const LC_FIELD *field, int B, const LC_REAL *z, LC_REAL *g, LC_REAL *work);
};

/* euler.c: the runner (see there). */
long LC_FN(lc_euler_work)(const LC_FIELD *field, int B);
void LC_FN(lc_euler)(const LC_FIELD *field, int B, int n, LC_REAL dt, LC_REAL *z, int groups,
                     const int *widths, LC_REAL *res, LC_REAL *work);

#endif
