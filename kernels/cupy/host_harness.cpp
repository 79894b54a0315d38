// host_harness.cpp -- builds every CUDA kernel of this backend as a plain host function
// (compile with -DBPTT_HOST_HARNESS; see common.cu), so that tests on a machine without a GPU
// run the kernels' own arithmetic and indexing through bptt_kernels.cupy.host_emulation.
// Same names and argument lists as the CUDA kernels; bptt_host_config() sets the emulated
// grid size, the item order and the shared-memory bytes of the next call.
#include "recurrent.cu"
#include "ops.cu"
