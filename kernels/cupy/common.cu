// common.cu -- definitions shared by recurrent.cu and ops.cu (a header: it defines no kernel).
//
// Named .cu so that the package-data pattern kernels/cupy/*.cu ships it; the Python loader
// (bptt_kernels/cupy/_compile.py) inlines it textually where a source says
// `#include "common.cu"`, so CuPy's on-disk kernel cache key covers its text too.
//
// Every kernel source compiles three ways:
//   * NVRTC through cupy.RawModule at run time (the GPU backend),
//   * nvcc --ptx / --cubin -arch=sm_90 (the offline checks in tests/test_ptx_cupy.py),
//   * a host C++ compiler with -DBPTT_HOST_HARNESS (host_emulation.py): every kernel body then
//     runs on the CPU, with its CUDA threads emulated, so its arithmetic and indexing can be
//     checked against bptt_kernels.reference on a machine without a GPU.
// Kernel bodies are therefore written against a tiny execution policy ("Exec"):
//   ex.count(n) / ex.item(k, n)   the k-th of the items 0..n-1 that this thread owns,
//   ex.block(), ex.nblocks()      block index and count (persistent / per-row kernels),
//   ex.tid(), ex.nthreads()       thread index and count inside the block (reductions),
//   ex.sync()                     __syncthreads().
// and, in the cooperative kernels only (every block resident at once, see recurrent.cu):
//   ex.grid_sync()                a barrier of every thread of the grid,
//   ldcg(p)                       a load of what another block wrote before the last grid_sync
//                                 (through L2: an SM's L1 is not coherent with the others').
// On the host, a grid-stride kernel is one thread owning every item; a block kernel runs its
// blockDim threads as coroutines switched at every barrier, in order or in reverse order
// (HostBlockRun below): a missing barrier, or a thread reading another thread's result of the
// same phase, then reads NaN-poisoned shared memory or disagrees between the two orders.
// A cooperative kernel runs the threads of all its blocks as one set of coroutines, block by
// block from grid barrier to grid barrier, so a block that skips one reads poisoned memory.

#ifndef BPTT_COMMON_CU
#define BPTT_COMMON_CU

#if defined(BPTT_HOST_HARNESS)
#include <ucontext.h>

#include <cmath>
#include <functional>
#include <limits>
#include <memory>
#include <vector>
#define BPTT_HD inline
#define BPTT_KERNEL(name, max_threads) extern "C" void name
#else
#define BPTT_HD __host__ __device__ __forceinline__
#define BPTT_KERNEL(name, max_threads) \
    extern "C" __global__ void __launch_bounds__(max_threads) name
#endif

namespace bptt {

// ---- math in the type of the argument (no float -> double promotion in float32 kernels) ----
BPTT_HD float exp_(float x) { return expf(x); }
BPTT_HD double exp_(double x) { return exp(x); }
BPTT_HD float log_(float x) { return logf(x); }
BPTT_HD double log_(double x) { return log(x); }
BPTT_HD float tanh_(float x) { return tanhf(x); }
BPTT_HD double tanh_(double x) { return tanh(x); }
BPTT_HD float sqrt_(float x) { return sqrtf(x); }
BPTT_HD double sqrt_(double x) { return sqrt(x); }

template <class Real>
BPTT_HD Real sigmoid(Real a) {
    // 1 / (1 + exp(-a)) without overflow: exp of a non-positive number only
    const Real e = exp_(a >= Real(0) ? -a : a);
    return a >= Real(0) ? Real(1) / (Real(1) + e) : e / (Real(1) + e);
}

// linear index of element j of row (t, b) in a [T, B, width] array
BPTT_HD long long at(int t, int b, int B, int width, int j) {
    return ((long long)t * B + b) * width + j;
}

// the most negative finite value (start of a running maximum)
BPTT_HD float lowest(float) { return -3.402823466e38f; }
BPTT_HD double lowest(double) { return -1.7976931348623157e308; }

template <class Real>
BPTT_HD void atomic_add(Real* p, Real v) {
#if defined(__CUDA_ARCH__)
    atomicAdd(p, v);  // double atomicAdd: sm_60 and later
#else
    *p += v;
#endif
}

// ---- execution policies ----
#if defined(BPTT_HOST_HARNESS)

// launch configuration for the next host "launch" (set from Python through ctypes)
inline int host_grid = 1;
inline int host_block = 1;
inline int host_reverse = 0;
inline long long host_smem_bytes = 0;
inline int host_error = 0;  // set when the threads of a block reach different barriers

extern "C" void bptt_host_config(int grid, int block, int reverse, long long smem_bytes) {
    host_grid = grid;
    host_block = block;
    host_reverse = reverse;
    host_smem_bytes = smem_bytes;
    host_error = 0;
}

extern "C" int bptt_host_error() { return host_error; }

// Grid-stride kernels (no barriers): one host thread owns every item.
struct HostGridExec {
    int reverse;
    long long count(long long n) const { return n; }
    long long item(long long k, long long n) const { return reverse ? n - 1 - k : k; }
};

struct HostBlockRun;
inline HostBlockRun* host_run = nullptr;

// One emulated CUDA thread of a block kernel: same items as on the device, and sync() a real
// barrier: the thread yields to the block's scheduler until every thread has reached it.
struct HostExec {
    int blk, tid_, nthr, slot;  // slot: this thread's index among the coroutines of the run
    int block() const { return blk; }
    int nblocks() const { return host_grid; }
    int tid() const { return tid_; }
    int nthreads() const { return nthr; }
    long long count(long long n) const { return tid_ < n ? (n - 1 - tid_) / nthr + 1 : 0; }
    long long item(long long k, long long) const { return tid_ + k * nthr; }
    void sync() const { wait(false); }
    void grid_sync() const { wait(true); }
    void wait(bool grid) const;
};

// The threads of `nblk` blocks as coroutines (ucontext), run one after the other (in reverse
// order with host_reverse) from barrier to barrier. Shared memory is poisoned with NaN, so a
// thread that reads what another thread writes after the barrier it forgot reads NaN. The
// blocks of a cooperative run go one at a time from grid barrier to grid barrier (the first
// or, reversed, the last block first): a block that skips a grid barrier races ahead and
// reads what the other blocks have not written yet.
struct HostBlockRun {
    std::function<void(const HostExec&)> body;
    int first_blk = 0, current = 0;
    std::vector<ucontext_t> ctx;
    std::vector<int> done, syncs, at_grid;
    ucontext_t sched;
};

inline void host_thread_entry() {
    HostBlockRun* run = host_run;
    const int slot = run->current;
    run->body(HostExec{run->first_blk + slot / host_block, slot % host_block, host_block, slot});
    run->done[slot] = 1;  // returning resumes the scheduler (uc_link)
}

inline void HostExec::wait(bool grid) const {
    HostBlockRun* run = host_run;
    run->syncs[slot] += 1;
    run->at_grid[slot] = grid;
    swapcontext(&run->ctx[slot], &run->sched);
}

// the live threads among slots [first, first + n) wait at one barrier (same count, same kind)
inline bool host_same_barrier(const HostBlockRun& run, int first, int n) {
    int at = -1, grid = -1;
    for (int slot = first; slot < first + n; ++slot) {
        if (run.done[slot]) continue;
        if (at < 0) { at = run.syncs[slot]; grid = run.at_grid[slot]; }
        else if (run.syncs[slot] != at || run.at_grid[slot] != grid) return false;
    }
    return true;
}

// Blocks first_blk .. first_blk + nblk - 1 together (nblk = 1: one block of a block kernel;
// nblk = host_grid: the whole grid of a cooperative kernel).
template <class F>
void host_run_blocks(int first_blk, int nblk, F&& body) {
    constexpr size_t kStack = 128 * 1024;
    static std::vector<std::unique_ptr<char[]>> stacks;  // reused between runs
    const int n = nblk * host_block;
    while ((int)stacks.size() < n) stacks.emplace_back(new char[kStack]);
    HostBlockRun run;
    run.body = body;
    run.first_blk = first_blk;
    run.ctx.resize(n);
    run.done.assign(n, 0);
    run.syncs.assign(n, 0);
    run.at_grid.assign(n, 0);
    for (int slot = 0; slot < n; ++slot) {
        getcontext(&run.ctx[slot]);
        run.ctx[slot].uc_stack.ss_sp = stacks[slot].get();
        run.ctx[slot].uc_stack.ss_size = kStack;
        run.ctx[slot].uc_link = &run.sched;
        makecontext(&run.ctx[slot], host_thread_entry, 0);
    }
    HostBlockRun* outer = host_run;
    host_run = &run;
    const int nb = host_block;
    for (;;) {
        for (int bi = 0; bi < nblk; ++bi) {  // each block up to its next grid barrier, or its end
            const int first = (host_reverse ? nblk - 1 - bi : bi) * nb;
            for (bool ran = true; ran;) {
                ran = false;
                for (int i = 0; i < nb; ++i) {  // every live thread runs up to its next barrier
                    const int slot = first + (host_reverse ? nb - 1 - i : i);
                    if (run.done[slot] || run.at_grid[slot]) continue;
                    ran = true;
                    run.current = slot;
                    swapcontext(&run.sched, &run.ctx[slot]);
                }
                if (!host_same_barrier(run, first, nb)) host_error = 1;
            }
        }
        bool live = false;
        for (int slot = 0; slot < n; ++slot) live = live || !run.done[slot];
        if (!live) break;
        if (!host_same_barrier(run, 0, n)) {  // a thread left or skipped a grid barrier
            host_error = 1;
            break;
        }
        run.at_grid.assign(n, 0);  // every block has arrived: release them all
    }
    host_run = outer;
}

template <class Real>
inline Real ldcg(const Real* p) { return *p; }

// shared memory emulated by a buffer poisoned with NaN for every block
#define BPTT_GRID_EXEC(ex) const bptt::HostGridExec ex{bptt::host_reverse};
#define BPTT_BLOCKS_BEGIN(ex, smem, Real)                                                  \
    for (int bptt_blk = 0; bptt_blk < bptt::host_grid; ++bptt_blk) {                     \
        std::vector<Real> bptt_buf(bptt::host_smem_bytes / sizeof(Real) + 1,              \
                                   std::numeric_limits<Real>::quiet_NaN());               \
        Real* smem = bptt_buf.data();                                                     \
        bptt::host_run_blocks(bptt_blk, 1, [&](const bptt::HostExec& ex) {
#define BPTT_BLOCKS_END });}
// a cooperative kernel: every block at once, each with its own poisoned shared memory
#define BPTT_GRID_BEGIN(ex, smem, Real, barrier)                                           \
    {                                                                                     \
        (void)barrier;                                                                    \
        const long long bptt_words = bptt::host_smem_bytes / (long long)sizeof(Real) + 1; \
        std::vector<Real> bptt_buf(bptt_words * bptt::host_grid,                          \
                                   std::numeric_limits<Real>::quiet_NaN());               \
        bptt::host_run_blocks(0, bptt::host_grid, [&](const bptt::HostExec& ex) {         \
            Real* smem = bptt_buf.data() + ex.block() * bptt_words;
#define BPTT_GRID_END });}

#else  // CUDA

// All threads of the grid share the items (grid-stride loop).
struct GridExec {
    BPTT_HD long long first() const {
#if defined(__CUDA_ARCH__)
        return (long long)blockIdx.x * blockDim.x + threadIdx.x;
#else
        return 0;
#endif
    }
    BPTT_HD long long stride() const {
#if defined(__CUDA_ARCH__)
        return (long long)gridDim.x * blockDim.x;
#else
        return 1;
#endif
    }
    BPTT_HD long long count(long long n) const {
        const long long f = first();
        return f < n ? (n - 1 - f) / stride() + 1 : 0;
    }
    BPTT_HD long long item(long long k, long long) const { return first() + k * stride(); }
};

// The threads of one block share the items; blocks work on separate data.
struct BlockExec {
    BPTT_HD int block() const {
#if defined(__CUDA_ARCH__)
        return blockIdx.x;
#else
        return 0;
#endif
    }
    BPTT_HD int nblocks() const {
#if defined(__CUDA_ARCH__)
        return gridDim.x;
#else
        return 1;
#endif
    }
    BPTT_HD int tid() const {
#if defined(__CUDA_ARCH__)
        return threadIdx.x;
#else
        return 0;
#endif
    }
    BPTT_HD int nthreads() const {
#if defined(__CUDA_ARCH__)
        return blockDim.x;
#else
        return 1;
#endif
    }
    BPTT_HD long long count(long long n) const {
        return tid() < n ? (n - 1 - tid()) / nthreads() + 1 : 0;
    }
    BPTT_HD long long item(long long k, long long) const { return tid() + k * nthreads(); }
    BPTT_HD void sync() const {
#if defined(__CUDA_ARCH__)
        __syncthreads();
#endif
    }
};

// A block of a cooperative kernel: BlockExec plus a barrier of the whole grid on a counter in
// global memory that starts at 0 and only grows (barrier n is passed when it reaches
// n * gridDim.x). Every block must be resident at once: the engine launches at most one
// block per SM, each within the SM's limits.
struct GridSyncExec : BlockExec {
    unsigned int* counter;
    mutable unsigned int target;  // thread 0's count of arrivals that ends its next barrier
    BPTT_HD explicit GridSyncExec(unsigned int* c) : counter(c), target(0) {}
    BPTT_HD void grid_sync() const {
#if defined(__CUDA_ARCH__)
        __syncthreads();                       // the block's writes precede thread 0's fence
        if (threadIdx.x == 0) {
            target += gridDim.x;
            __threadfence();                   // ... and are visible device-wide
            atomicAdd(counter, 1u);
            while (*(volatile unsigned int*)counter < target) __nanosleep(32);
            __threadfence();
        }
        __syncthreads();
#endif
    }
};

template <class Real>
BPTT_HD Real ldcg(const Real* p) {
#if defined(__CUDA_ARCH__)
    return __ldcg(p);
#else
    return *p;
#endif
}

extern __shared__ __align__(16) unsigned char bptt_dynamic_smem[];

#define BPTT_GRID_EXEC(ex) const bptt::GridExec ex;
#define BPTT_BLOCKS_BEGIN(ex, smem, Real)                                  \
    {                                                                     \
        Real* smem = reinterpret_cast<Real*>(bptt::bptt_dynamic_smem);    \
        const bptt::BlockExec ex;
#define BPTT_BLOCKS_END }
#define BPTT_GRID_BEGIN(ex, smem, Real, barrier)                           \
    {                                                                     \
        Real* smem = reinterpret_cast<Real*>(bptt::bptt_dynamic_smem);    \
        const bptt::GridSyncExec ex(barrier);
#define BPTT_GRID_END }

#endif

}  // namespace bptt

#endif  // BPTT_COMMON_CU
