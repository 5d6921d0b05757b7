/* Probes for the Lamarr tracking chain. SQLamarr passes a Plugin its query's inputs and
 * a GenerativePlugin also N_RANDOM normal values drawn from the connection's generator;
 * these functions copy what they received to their outputs, so that a Plugin or
 * GenerativePlugin running the chain's own query records exactly the float32 inputs
 * (and noise) each model received, in order. */
#include <string.h>

#ifndef N_FEATURES
#define N_FEATURES 12      /* acceptance, efficiency, resolution */
#endif
#ifndef N_COV_FEATURES
#define N_COV_FEATURES 15  /* covariance */
#endif
#ifndef N_RANDOM
#define N_RANDOM 128
#endif

float *echo_features(float *out, const float *in)
{
    memcpy(out, in, N_FEATURES * sizeof(float));
    return out;
}

float *echo_resolution(float *out, const float *in, const float *rnd)
{
    memcpy(out, in, N_FEATURES * sizeof(float));
    memcpy(out + N_FEATURES, rnd, N_RANDOM * sizeof(float));
    return out;
}

float *echo_covariance(float *out, const float *in, const float *rnd)
{
    memcpy(out, in, N_COV_FEATURES * sizeof(float));
    memcpy(out + N_COV_FEATURES, rnd, N_RANDOM * sizeof(float));
    return out;
}
