/* Times a Lamarr-ABI model library the way Lamarr calls it, with no Python in the loop.
 *
 *   timing LIB SYMBOL INPUTS.f32 N_ROWS N_INPUTS N_OUTPUTS REPEATS MODE [WINDOWS]
 *
 * INPUTS.f32 holds N_ROWS x N_INPUTS raw float32 features. MODE is "call" (one
 * particle per call of SYMBOL, as SQLamarr does) or "batch" (one call of
 * SYMBOL_batch per window). Each repeat runs the rows as WINDOWS (default 1) equal
 * consecutive windows of N_ROWS / WINDOWS rows, each timed alone, and prints one line
 * "min mean": microseconds per particle of its fastest window and over all windows.
 * On a shared machine most long windows are preempted; the fastest short window is
 * the code's own speed (c_harness/floors.c times its floors the same way).
 * A checksum of the outputs is printed so the compiler cannot drop the work. */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

typedef float *(*row_fn)(float *, const float *);
typedef void (*batch_fn)(float *, const float *, long);

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

int main(int argc, char **argv)
{
    if (argc != 9 && argc != 10) {
        fprintf(stderr, "usage: %s LIB SYMBOL INPUTS.f32 N_ROWS N_INPUTS N_OUTPUTS REPEATS call|batch [WINDOWS]\n", argv[0]);
        return 2;
    }
    const char *lib_path = argv[1], *symbol = argv[2], *input_path = argv[3], *mode = argv[8];
    long n_rows = atol(argv[4]), n_in = atol(argv[5]), n_out = atol(argv[6]), repeats = atol(argv[7]);
    long windows = argc == 10 ? atol(argv[9]) : 1;
    if (windows < 1 || windows > n_rows) { fprintf(stderr, "WINDOWS must be in 1..N_ROWS\n"); return 2; }
    long chunk = n_rows / windows;  /* rows per window; the last n_rows % windows rows are not timed */

    void *lib = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "dlopen %s: %s\n", lib_path, dlerror()); return 1; }

    float *in = malloc(sizeof(float) * n_rows * n_in);
    float *out = malloc(sizeof(float) * n_rows * n_out);
    FILE *f = fopen(input_path, "rb");
    if (!in || !out || !f || fread(in, sizeof(float) * n_in, n_rows, f) != (size_t)n_rows) {
        fprintf(stderr, "cannot read %ld rows of %ld floats from %s\n", n_rows, n_in, input_path);
        return 1;
    }
    fclose(f);

    row_fn row = NULL;
    batch_fn batch = NULL;
    if (strcmp(mode, "batch") == 0) {
        char name[256];
        snprintf(name, sizeof name, "%s_batch", symbol);
        *(void **)&batch = dlsym(lib, name);
        if (!batch) { fprintf(stderr, "no symbol %s in %s\n", name, lib_path); return 1; }
    } else {
        *(void **)&row = dlsym(lib, symbol);
        if (!row) { fprintf(stderr, "no symbol %s in %s\n", symbol, lib_path); return 1; }
    }

    double checksum = 0;
    for (long rep = -1; rep < repeats; rep++) {  /* rep -1 warms caches, not printed */
        double best = 1e300, total = 0;
        for (long w = 0; w < windows; w++) {
            const float *x = in + w * chunk * n_in;
            float *y = out + w * chunk * n_out;
            double t0 = now_us();
            if (batch) {
                batch(y, x, chunk);
            } else {
                for (long i = 0; i < chunk; i++)
                    row(y + i * n_out, x + i * n_in);
            }
            double dt = now_us() - t0;
            best = dt < best ? dt : best;
            total += dt;
            checksum += y[(chunk - 1) * n_out];
        }
        if (rep >= 0) printf("%.4f %.4f\n", best / chunk, total / (chunk * windows));
    }
    fprintf(stderr, "checksum %g\n", checksum);
    free(in);
    free(out);
    dlclose(lib);
    return 0;
}
