/* Calls a Lamarr-ABI library from several threads at once, as SQLamarr does (one
 * connection per thread), and checks every thread's outputs and track types are
 * bit-identical to a single-threaded pass.
 *
 *   threads LIB SYMBOL INPUTS.f32 N_ROWS N_INPUTS N_OUTPUTS N_THREADS ROUNDS
 *
 * Exit status 0 when all agree; 1 with the first differing row otherwise. */
#define _POSIX_C_SOURCE 200809L
#include <dlfcn.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef float *(*row_fn)(float *, const float *);
typedef int (*draw_fn)(const float *, float);

struct job {
    row_fn row;
    draw_fn draw;
    const float *in;
    long n_rows, n_in, n_out, rounds, offset;
    float *out;
    int *types;
};

static float uniform(long i) { return (float)((i * 2654435761UL) % 1000003UL) / 1000003.0f; }

static void *work(void *arg)
{
    struct job *j = arg;
    for (long round = 0; round < j->rounds; round++) {
        /* Each thread starts at a different row so calls really interleave. */
        for (long k = 0; k < j->n_rows; k++) {
            long i = (k + j->offset + round) % j->n_rows;
            j->row(j->out + i * j->n_out, j->in + i * j->n_in);
            j->types[i] = j->draw(j->in + i * j->n_in, uniform(i));
        }
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 9) {
        fprintf(stderr, "usage: %s LIB SYMBOL INPUTS.f32 N_ROWS N_INPUTS N_OUTPUTS N_THREADS ROUNDS\n", argv[0]);
        return 2;
    }
    long n_rows = atol(argv[4]), n_in = atol(argv[5]), n_out = atol(argv[6]);
    long n_threads = atol(argv[7]), rounds = atol(argv[8]);
    void *lib = dlopen(argv[1], RTLD_NOW | RTLD_LOCAL);
    if (!lib) { fprintf(stderr, "dlopen %s: %s\n", argv[1], dlerror()); return 2; }
    char name[256];
    row_fn row;
    draw_fn draw;
    *(void **)&row = dlsym(lib, argv[2]);
    snprintf(name, sizeof name, "%s_track_type", argv[2]);
    *(void **)&draw = dlsym(lib, name);
    if (!row || !draw) { fprintf(stderr, "missing %s or %s in %s\n", argv[2], name, argv[1]); return 2; }

    float *in = malloc(sizeof(float) * n_rows * n_in);
    FILE *f = fopen(argv[3], "rb");
    if (!in || !f || fread(in, sizeof(float) * n_in, n_rows, f) != (size_t)n_rows) {
        fprintf(stderr, "cannot read %ld rows from %s\n", n_rows, argv[3]);
        return 2;
    }
    fclose(f);

    struct job *jobs = calloc(n_threads + 1, sizeof *jobs);
    pthread_t *tid = calloc(n_threads, sizeof *tid);
    for (long t = 0; t <= n_threads; t++) {
        jobs[t] = (struct job){row, draw, in, n_rows, n_in, n_out, t == 0 ? 1 : rounds,
                               t * n_rows / (n_threads + 1),
                               malloc(sizeof(float) * n_rows * n_out), malloc(sizeof(int) * n_rows)};
    }
    work(&jobs[0]);  /* the single-threaded reference */
    for (long t = 1; t <= n_threads; t++) pthread_create(&tid[t - 1], NULL, work, &jobs[t]);
    for (long t = 1; t <= n_threads; t++) pthread_join(tid[t - 1], NULL);

    for (long t = 1; t <= n_threads; t++) {
        for (long i = 0; i < n_rows; i++) {
            if (memcmp(jobs[t].out + i * n_out, jobs[0].out + i * n_out, sizeof(float) * n_out) != 0
                || jobs[t].types[i] != jobs[0].types[i]) {
                printf("thread %ld row %ld differs from the single-threaded result\n", t, i);
                return 1;
            }
        }
    }
    printf("%ld threads x %ld rounds x %ld rows: bit-identical\n", n_threads, rounds, n_rows);
    return 0;
}
