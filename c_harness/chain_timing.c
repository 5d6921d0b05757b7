/* Times a tracking library (symbols acceptance, efficiency, resolution, covariance) the
 * way Lamarr calls it, one particle per call, with no Python in the loop.
 *
 *   chain_timing LIB MODE N_ROWS REPEATS FEATURES.f32 RESOLUTION_IN.f32 NOISE.f32
 *
 * FEATURES.f32: N_ROWS x 12 raw efficiency features; RESOLUTION_IN.f32: N_ROWS x 12 raw
 * resolution inputs; NOISE.f32: N_ROWS x 2 x N_RANDOM N(0,1) values. MODE is one symbol
 * (one call per row) or "chain": the four calls a reconstructed track costs, run as
 * SQLamarr runs the chain (each model over all rows in turn), the covariance fed from
 * the resolution's inputs and outputs as Lamarr's query does (6 track reals,
 * chi2PerDoF, nDoF_f, ghostProb, 6 flags). Prints one line per repeat: microseconds
 * per row. A checksum keeps the compiler from dropping the work. */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define N_RANDOM 128

typedef float *(*plugin_fn)(float *, const float *);
typedef float *(*generator_fn)(float *, const float *, const float *);

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec * 1e-3;
}

static float *read_floats(const char *path, long n)
{
    float *buf = malloc(sizeof(float) * n);
    FILE *f = fopen(path, "rb");
    if (!buf || !f || fread(buf, sizeof(float), n, f) != (size_t)n) {
        fprintf(stderr, "cannot read %ld floats from %s\n", n, path);
        exit(1);
    }
    fclose(f);
    return buf;
}

static void *need(void *lib, const char *name, const char *path)
{
    void *sym = dlsym(lib, name);
    if (!sym) { fprintf(stderr, "no symbol %s in %s\n", name, path); exit(1); }
    return sym;
}

int main(int argc, char **argv)
{
    if (argc != 8) {
        fprintf(stderr, "usage: %s LIB MODE N_ROWS REPEATS FEATURES.f32 RESOLUTION_IN.f32 NOISE.f32\n", argv[0]);
        return 2;
    }
    const char *lib_path = argv[1], *mode = argv[2];
    long n = atol(argv[3]), repeats = atol(argv[4]);
    void *lib = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "dlopen %s: %s\n", lib_path, dlerror()); return 1; }
    float *feat = read_floats(argv[5], n * 12), *res_in = read_floats(argv[6], n * 12);
    float *noise = read_floats(argv[7], n * 2 * N_RANDOM);

    int chain = strcmp(mode, "chain") == 0;
    plugin_fn acc = NULL, eff = NULL;
    generator_fn res = NULL, cov = NULL;
    if (chain || strcmp(mode, "acceptance") == 0) *(void **)&acc = need(lib, "acceptance", lib_path);
    if (chain || strcmp(mode, "efficiency") == 0) *(void **)&eff = need(lib, "efficiency", lib_path);
    if (chain || strcmp(mode, "resolution") == 0) *(void **)&res = need(lib, "resolution", lib_path);
    if (chain || strcmp(mode, "covariance") == 0) *(void **)&cov = need(lib, "covariance", lib_path);
    if (!acc && !eff && !res && !cov) { fprintf(stderr, "unknown mode %s\n", mode); return 2; }

    float out_acc[1] = {0}, out_eff[4] = {0}, out_cov[15] = {0}, cov_in[15];
    float *out_res = calloc((size_t)n * 9, sizeof(float));
    if (!out_res) { fprintf(stderr, "out of memory\n"); return 1; }
    double checksum = 0;
    /* As SQLamarr runs the chain: each step is one pass over all its rows (a Plugin or
     * GenerativePlugin per model), the covariance reading what the resolution stored. */
    for (long rep = -1; rep < repeats; rep++) {  /* rep -1 warms caches, not printed */
        double t0 = now_us();
        if (acc) for (long i = 0; i < n; i++) acc(out_acc, feat + i * 12);
        if (eff) for (long i = 0; i < n; i++) eff(out_eff, feat + i * 12);
        if (res) for (long i = 0; i < n; i++) res(out_res + i * 9, res_in + i * 12, noise + i * 2 * N_RANDOM);
        if (cov) for (long i = 0; i < n; i++) {
            const float *r = res_in + i * 12;
            memcpy(cov_in, r, 6 * sizeof(float));
            if (res) memcpy(cov_in + 6, out_res + i * 9 + 6, 3 * sizeof(float));
            else { cov_in[6] = 1.0f; cov_in[7] = 20.0f; cov_in[8] = 0.05f; }
            memcpy(cov_in + 9, r + 6, 6 * sizeof(float));
            cov(out_cov, cov_in, noise + i * 2 * N_RANDOM + N_RANDOM);
        }
        double dt = now_us() - t0;
        if (rep >= 0) printf("%.4f\n", dt / n);
        checksum += out_acc[0] * (acc != NULL) + out_eff[1] * (eff != NULL)
                  + out_res[(n - 1) * 9] * (res != NULL) + out_cov[0] * (cov != NULL);
    }
    fprintf(stderr, "checksum %g\n", checksum);
    free(feat); free(res_in); free(noise); free(out_res);
    dlclose(lib);
    return 0;
}
