/* The AVX2 + FMA build of LongLLaMA's kernels (module.h), compiled with -mavx2 -mfma on x86-64 and imported only on
   CPUs that have both (longllama/kernels.py). */
#define MODULE_NAME "longllama._kernels_avx2"
#define MODULE_INIT PyInit__kernels_avx2
#include "module.h"
