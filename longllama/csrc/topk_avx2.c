/* The AVX2 + FMA build of the running top-k kernel (topk.h), compiled with -mavx2 -mfma on x86-64 and imported only
   on CPUs that have both (longllama/search.py). */
#define MODULE_NAME "longllama._topk_avx2"
#define MODULE_INIT PyInit__topk_avx2
#include "topk.h"
