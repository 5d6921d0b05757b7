/* Loops for the parity harness (effgen/parity.py), so that per-particle calls and
 * millions of draws cost no Python per row. Every function takes the library's entry
 * points as function pointers: the same code drives a library opened with dlopen (ABI
 * mode) and one compiled into the harness's own extension (API mode).
 *
 * Plain C99, no allocation, no state. */
#ifndef EFFGEN_PARITY_HELPERS_C
#define EFFGEN_PARITY_HELPERS_C

typedef float *(*effgen_parity_row_fn)(float *out, const float *in);
typedef int (*effgen_parity_track_fn)(const float *in, float r);

/* out[i] = f(in[i]) one row per call, exactly as SQLamarr's Plugin calls the model.
 * Returns the index of the first row whose call did not return its `out`, or -1. */
static long effgen_parity_rows(effgen_parity_row_fn f, float *out, const float *in, long n,
                               int n_in, int n_out)
{
    long i, bad = -1;
    for (i = 0; i < n; ++i) {
        float *o = out + i * n_out;
        if (f(o, in + i * n_in) != o && bad < 0)
            bad = i;
    }
    return bad;
}

/* types[d] = track_type(in[row], r[d]) with row = rows[d] (or d % n_rows when rows is
 * NULL): n_draws draws, each with its own uniform. */
static void effgen_parity_tracks(effgen_parity_track_fn f, int *types, const float *in,
                                 long n_rows, int n_in, const long *rows, const float *r,
                                 long n_draws)
{
    long d;
    for (d = 0; d < n_draws; ++d) {
        long row = rows ? rows[d] : d % n_rows;
        types[d] = f(in + row * n_in, r[d]);
    }
}

#endif
