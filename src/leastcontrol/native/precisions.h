/* Include the file named LC_SELF once per precision: float (suffix _f32) and double (_f64).
 * A source file that holds one precision's code under `#ifdef LC_REAL` compiles both by
 *     #define LC_SELF "name.c"
 *     #include "precisions.h"
 * No include guard: it is meant to be included once per file that uses it. */
#define LC_REAL float
#define LC_SUF _f32
#define LC_TANH tanhf
#define LC_EXP expf
#include LC_SELF
#undef LC_REAL
#undef LC_SUF
#undef LC_TANH
#undef LC_EXP

#define LC_REAL double
#define LC_SUF _f64
#define LC_TANH tanh
#define LC_EXP exp
#include LC_SELF
#undef LC_REAL
#undef LC_SUF
#undef LC_TANH
#undef LC_EXP

#undef LC_SELF
