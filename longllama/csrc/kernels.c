/* The portable build of LongLLaMA's kernels (module.h): any C compiler, any CPU. */
#define MODULE_NAME "longllama._kernels"
#define MODULE_INIT PyInit__kernels
#include "module.h"
