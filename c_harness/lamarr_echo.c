/* Probe for the Lamarr runtime: a model with Lamarr's ABI that copies its 12 inputs
 * to 12 outputs. Run through an SQLamarr Plugin with the efficiency query, it records
 * exactly the float32 inputs (and their order) the efficiency function receives. */
#include <string.h>

float *echo(float *out, const float *in)
{
    memcpy(out, in, 12 * sizeof(float));
    return out;
}
