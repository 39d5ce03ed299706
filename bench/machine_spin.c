/* The machine's own 2-thread scaling, for bench/kld_throughput.py: a loop of float32 multiply-adds
 * on registers only (no memory traffic, nothing shared), 128 independent lanes (8 to 32 vector
 * chains) so that the FMA pipes stay full on any x86-64 core. Two threads running it side by side show how much of a
 * second core this machine gives to arithmetic at this moment (boost clocks, a shared physical
 * core, other tenants): a reference for a compute-bound kernel's 2-thread speedup. */

#include <stdint.h>

double spin(int64_t iters) {
    float x[128];
    for (int k = 0; k < 128; k++) x[k] = 1.0f + 1e-3f * (float)k;
    for (int64_t i = 0; i < iters; i++)
        for (int k = 0; k < 128; k++) x[k] = x[k] * 0.999999f + 1e-7f;
    double s = 0.0;
    for (int k = 0; k < 128; k++) s += x[k];
    return s;
}
