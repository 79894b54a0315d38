// ops.cu -- the non-recurrent kernels of the CuPy backend: fused softmax cross-entropy,
// embedding gather / scatter-add, torch.optim SGD and Adam steps, sum of squares, scale.
// Shapes in the comment of every kernel; Real is float (f32) or double (f64).
// Compiled with -DBPTT_SELECT -DBPTT_SELECT_<f32|f64>, only that dtype's kernels are built.

#include "common.cu"

namespace bptt {

// One block per row n of logits [N,V]: pass 1 a running (max, sum of exp) per thread, merged
// across the block; pass 2 writes dlogits [N,V] = scale * (softmax - onehot(target)).
// targets [N] (< 0: row ignored: zero dlogits, zero loss); row_loss [N] out (float64).
// dlogits may alias logits: every logit a thread reads in pass 2 is the one it overwrites, and
// the target's logit is read in pass 1, before the barrier.
// Shared memory: 2 * nthreads + 1 Real (running max, running sum, target logit).
template <class Real, class Exec>
BPTT_HD void softmax_xent_row(const Exec& ex, Real* smem, int N, int V, const Real* logits,
                              const long long* targets, Real* dlogits, Real scale,
                              double* row_loss) {
    const int n = ex.block();
    if (n >= N) return;
    const Real* x = logits + (long long)n * V;
    Real* d = dlogits + (long long)n * V;
    const long long target = targets[n];
    const int tid = ex.tid(), nt = ex.nthreads();
    Real* run_max = smem;                 // nthreads
    Real* run_sum = smem + nt;            // nthreads
    Real* target_logit = smem + 2 * nt;   // 1
    Real m = lowest(Real(0)), s = Real(0);
    for (long long k = 0, c = ex.count(V); k < c; ++k) {
        const Real v = x[ex.item(k, V)];
        if (v > m) { s = s * exp_(m - v) + Real(1); m = v; }  // rescale the sum to the new max
        else { s += exp_(v - m); }
    }
    run_max[tid] = m;
    run_sum[tid] = s;
    if (tid == 0) target_logit[0] = target >= 0 ? x[target] : Real(0);
    ex.sync();
    for (int w = nt / 2; w > 0; w /= 2) {  // tree merge of (max, sum) pairs; nthreads = 2^k
        if (tid < w) {
            const Real m1 = run_max[tid], m2 = run_max[tid + w];
            const Real mm = m1 > m2 ? m1 : m2;
            run_sum[tid] = run_sum[tid] * exp_(m1 - mm) + run_sum[tid + w] * exp_(m2 - mm);
            run_max[tid] = mm;
        }
        ex.sync();
    }
    const Real row_max = run_max[0], row_sum = run_sum[0];
    for (long long k = 0, c = ex.count(V); k < c; ++k) {
        const long long i = ex.item(k, V);
        const Real p = exp_(x[i] - row_max) / row_sum;               // softmax
        d[i] = target < 0 ? Real(0) : scale * (p - (i == target ? Real(1) : Real(0)));
    }
    if (tid == 0)  // -log softmax[target] = log(sum) + max - logit[target]
        row_loss[n] = target < 0 ? 0.0 : (double)(log_(row_sum) + row_max - target_logit[0]);
}

// Sum of squares of a [n] accumulated in float64 into out[0] (atomically; out pre-zeroed).
// Shared memory: nthreads doubles.
template <class Real, class Exec>
BPTT_HD void sum_squares_block(const Exec& ex, double* smem, long long n, const Real* a,
                               double* out) {
    const int tid = ex.tid(), nt = ex.nthreads();
    const long long stride = (long long)ex.nblocks() * nt;
    double s = 0.0;
    for (long long i = (long long)ex.block() * nt + tid; i < n; i += stride) {
        const double v = (double)a[i];
        s += v * v;
    }
    smem[tid] = s;
    ex.sync();
    for (int w = nt / 2; w > 0; w /= 2) {
        if (tid < w) smem[tid] += smem[tid + w];
        ex.sync();
    }
    if (tid == 0) atomic_add(out, smem[0]);
}

}  // namespace bptt

#define BPTT_OPS_KERNELS(SFX, Real)                                                           \
    /* logits, dlogits [N,V]; targets [N] int64; row_loss [N] float64. grid N, 2^k threads */ \
    BPTT_KERNEL(softmax_xent_##SFX, 256)(int N, int V, const Real* logits,                   \
                                           const long long* targets, Real* dlogits,           \
                                           Real scale, double* row_loss) {                    \
        BPTT_BLOCKS_BEGIN(ex, smem, Real)                                                     \
        bptt::softmax_xent_row(ex, smem, N, V, logits, targets, dlogits, scale, row_loss);    \
        BPTT_BLOCKS_END                                                                       \
    }                                                                                         \
    /* weight [V,E]; ids [n] int64 (checked in range by the caller); out [n,E] */             \
    BPTT_KERNEL(embedding_forward_##SFX, 256)(long long n, int E, const Real* weight,         \
                                               const long long* ids, Real* out) {             \
        BPTT_GRID_EXEC(ex)                                                                    \
        for (long long k = 0, c = ex.count(n * E); k < c; ++k) {                              \
            const long long e = ex.item(k, n * E), row = e / E;                               \
            out[e] = weight[ids[row] * E + (e - row * E)];                                    \
        }                                                                                     \
    }                                                                                         \
    /* dweight [V,E] += scatter-add of dout [n,E] at ids [n] (atomic: ids may repeat) */      \
    BPTT_KERNEL(embedding_backward_##SFX, 256)(long long n, int E, const long long* ids,      \
                                                const Real* dout, Real* dweight) {            \
        BPTT_GRID_EXEC(ex)                                                                    \
        for (long long k = 0, c = ex.count(n * E); k < c; ++k) {                              \
            const long long e = ex.item(k, n * E), row = e / E;                               \
            bptt::atomic_add(&dweight[ids[row] * E + (e - row * E)], dout[e]);                \
        }                                                                                     \
    }                                                                                         \
    /* torch.optim.SGD (dampening 0), in place. param, grad, buf [n] */                       \
    BPTT_KERNEL(sgd_step_##SFX, 256)(long long n, Real* param, const Real* grad, Real* buf,   \
                                      Real lr, Real momentum, Real weight_decay,              \
                                      int nesterov, int first) {                              \
        BPTT_GRID_EXEC(ex)                                                                    \
        for (long long k = 0, c = ex.count(n); k < c; ++k) {                                  \
            const long long i = ex.item(k, n);                                                \
            Real d = grad[i];                                                                 \
            if (weight_decay != Real(0)) d = d + weight_decay * param[i];                     \
            if (momentum != Real(0)) {                                                        \
                const Real b = first ? d : momentum * buf[i] + d;                             \
                buf[i] = b;                                                                   \
                d = nesterov ? d + momentum * b : b;                                          \
            }                                                                                 \
            param[i] = param[i] - lr * d;                                                     \
        }                                                                                     \
    }                                                                                         \
    /* torch.optim.Adam (L2 decay, no amsgrad), in place. param, grad, m, v [n].            */\
    /* lerp_weight = 1 - beta1, one_minus_beta2 = 1 - beta2 and step_size = lr / (1 -       */\
    /* beta1^step), bc2_sqrt = sqrt(1 - beta2^step) computed by the caller in float64.      */\
    BPTT_KERNEL(adam_step_##SFX, 256)(long long n, Real* param, const Real* grad, Real* m,    \
                                       Real* v, Real step_size, Real lerp_weight, Real beta2, \
                                       Real one_minus_beta2, Real eps, Real weight_decay,     \
                                       Real bc2_sqrt) {                                       \
        BPTT_GRID_EXEC(ex)                                                                    \
        for (long long k = 0, c = ex.count(n); k < c; ++k) {                                  \
            const long long i = ex.item(k, n);                                                \
            Real g = grad[i];                                                                 \
            if (weight_decay != Real(0)) g = g + weight_decay * param[i];                     \
            const Real mi = m[i];  /* torch's lerp: two formulas split at weight 0.5 */       \
            const Real mn = lerp_weight < Real(0.5)                                           \
                                ? mi + lerp_weight * (g - mi)                                 \
                                : g - (g - mi) * (Real(1) - lerp_weight);                     \
            const Real vn = v[i] * beta2 + one_minus_beta2 * g * g;                           \
            m[i] = mn;                                                                        \
            v[i] = vn;                                                                        \
            const Real denom = bptt::sqrt_(vn) / bc2_sqrt + eps;                              \
            param[i] = param[i] - step_size * (mn / denom);                                   \
        }                                                                                     \
    }                                                                                         \
    /* out[0] (float64, zeroed by the caller) += sum of a[n]^2; 2^k threads */                \
    BPTT_KERNEL(sum_squares_##SFX, 256)(long long n, const Real* a, double* out) {            \
        BPTT_BLOCKS_BEGIN(ex, smem, double)                                                   \
        bptt::sum_squares_block(ex, smem, n, a, out);                                         \
        BPTT_BLOCKS_END                                                                       \
    }                                                                                         \
    /* a [n] *= factor */                                                                     \
    BPTT_KERNEL(scale_##SFX, 256)(long long n, Real* a, Real factor) {                        \
        BPTT_GRID_EXEC(ex)                                                                    \
        for (long long k = 0, c = ex.count(n); k < c; ++k) a[ex.item(k, n)] *= factor;        \
    }

#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_f32)
BPTT_OPS_KERNELS(f32, float)
#endif
#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_f64)
BPTT_OPS_KERNELS(f64, double)
#endif
