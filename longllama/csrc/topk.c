/* The portable build of the running top-k kernel (topk.h): any C compiler, any CPU. */
#define MODULE_NAME "longllama._topk"
#define MODULE_INIT PyInit__topk
#include "topk.h"
