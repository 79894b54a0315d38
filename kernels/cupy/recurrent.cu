// recurrent.cu -- the recurrent kernels of the CuPy backend: LSTM, GRU, Elman RNN (tanh, relu).
//
// Notation: T steps, B batch, H hidden, G gates (LSTM 4: i f g o; GRU 3: r z n; RNN 1),
// GH = G*H. Arrays are C-contiguous, time-major; parameters in PyTorch's layout.
//
// Three paths share the per-unit cell math (struct Lstm / Gru / Rnn below) and the same cache:
//
//  general (any size; Haste's design), per step t, driven from Python:
//      hp = h_{t-1} @ w_hh^T                (cuBLAS through ctypes)   # B,GH
//      <cell>_forward_step(t, ...)           one fused gate kernel, one thread per (b, j)
//    and backward, per step t = T-1 .. t_start:
//      <cell>_backward_step(t, ...)          fused gate-gradient kernel
//      dh_rec = dgh[t] @ w_hh               (cuBLAS through ctypes)   # B,H
//
//  persistent (small B, W_hh fits in shared memory): ONE launch runs all steps.
//      One block per slice of `rows` batch rows; W_hh is copied once into shared memory and
//      stays there; the block's hidden state lives in shared memory between steps. Each dot
//      product is split over `splits` threads. Two __syncthreads per step in each direction.
//
//  cooperative (small B, any H whose W_hh fits in the shared memory of all SMs together):
//      ONE launch runs all steps. Block p owns the hidden units [p*U, p*U + U) of every batch
//      row and keeps W_hh's weights of those units in shared memory; the blocks meet at a
//      grid-wide barrier once per step, after which every block reads the step's h_t (forward)
//      or gate gradients (backward) that all blocks wrote. At most one block per SM, so all
//      are resident at once (the barrier needs that).
//
// The per-step GEMMs call cuBLAS directly through ctypes (_cublas.py: CuPy's wrappers refuse
// CUDA graph capture). Input projections x @ w_ih^T + b_ih for all steps (one GEMM before the
// loop) and the weight gradients / dx (big GEMMs after the backward loop) are done in Python
// with cupy.matmul (cuBLAS too).
//
// The activation cache (identical for the three paths; what backward needs):
//   y      [T,B,H]   h_1 .. h_T (every cell; the RNN derives act' from it)
//   gates  [T,B,GH]  activated gates: LSTM i,f,g,o; GRU r,z,n   (unused for RNN)
//   c      [T,B,H]   LSTM cell states c_1 .. c_T                  (LSTM only)
//   hn     [T,B,H]   GRU h_{t-1} W_hn^T + b_hn                    (GRU only)
// plus x, h0 and (LSTM) c0. Unused pointers receive a 1-element placeholder and are not read.
//
// Variable-length batches: every kernel takes steps [B] (int), row b's own steps (the call's
// lengths, or T for every row without). At a padded step t >= steps[b] the row's cache entries
// are written as zeros and its state is kept (Cell::pad); backward writes zero dh and gate
// gradients there, passes dc (LSTM) and dh_direct (GRU) on unchanged, and the row's last step
// steps[b]-1 takes dL/dh_t from dh_final instead of from step t+1 (BwdArgs::last). The padded
// rows still ride along in the per-step products (no repacking, no per-length launches).
// Without lengths the same code runs with steps = T for every row. Its cost, by count (no GPU
// was at hand to time it): per item and step one 4-byte load of steps[b] (one word for the H
// items of a row: an L1 hit, broadcast across a warp) and one compare, beside the 4 (Elman
// RNN) to 15 (LSTM) global loads and stores of the item's cell math; ptxas -v
// (tests/test_ptx_cupy.py) keeps every one-launch kernel within 64 registers and every float32
// kernel free of spills. A second, unmasked template variant of every kernel would save that
// load at twice the kernels to compile (NVRTC's cold start) and to check.

#include "common.cu"

namespace bptt {

// Pointers of one forward call. xp: input projections incl. b_ih.
template <class Real>
struct FwdArgs {
    int B, H;
    const int* steps;  // [B] row b's steps: step t is one of them where t < steps[b]
    const Real* xp;  // [T,B,GH]
    const Real* h0;  // [B,H]
    const Real* c0;  // [B,H]  (LSTM)
    Real* y;         // [T,B,H]
    Real* c;         // [T,B,H]  (LSTM)
    Real* gates;     // [T,B,GH] (LSTM, GRU)
    Real* hn;        // [T,B,H]  (GRU)
    BPTT_HD bool live(int t, int b) const { return t < steps[b]; }
};

// Pointers of one backward call.
template <class Real>
struct BwdArgs {
    int B, H;
    const int* steps;   // [B] row b's steps (as FwdArgs::steps)
    const Real* dy;     // [T,B,H]
    const Real* h0;     // [B,H]
    const Real* c0;     // [B,H]   (LSTM)
    const Real* y;      // [T,B,H]
    const Real* c;      // [T,B,H]  (LSTM)
    const Real* gates;  // [T,B,GH] (LSTM, GRU)
    const Real* hn;     // [T,B,H]  (GRU)
    const Real* dh_final;  // [B,H] dL/dh_T: what each row's last step takes (nothing via W_hh)
    Real* dh;           // [T,B,H]  out: total dL/dh_t
    Real* dgx;          // [T,B,GH] out: dL/d(x W_ih^T + b_ih), per step
    Real* dgh;          // [T,B,GH] out: dL/d(h W_hh^T + b_hh) (GRU only; == dgx otherwise)
    BPTT_HD bool live(int t, int b) const { return t < steps[b]; }
    BPTT_HD bool last(int t, int b) const { return t + 1 == steps[b]; }
};

// ---------------------------------------------------------------------------------------------
// Cells. forward(): unit j of batch row b at step t, given the hidden-side pre-activations
// hs[g] = (h_{t-1} W_hh^T + b_hh)[g*H + j]; writes the cache and returns h_t.
// backward(): given dh = total dL/dh_t, updates the running per-unit state (dc: LSTM dL/dc,
// to c_{t-1} on return; dh_direct: GRU's z*dh path to h_{t-1}), writes dgx (and dgh) and
// returns gh[g] = dL/d(hidden-side pre-activation g), the rows that multiply W_hh next.
// pad(): unit j of row b at a padded step t: zeros in the cache (the caller keeps the state).

template <class Real>
struct Lstm {
    static constexpr int G = 4;
    static constexpr bool separate_dgh = false;  // dgx is also the rows that multiply W_hh
    BPTT_HD static Real forward(const FwdArgs<Real>& a, int t, int b, int j, const Real (&hs)[G],
                                Real /*h_prev*/) {
        const int H = a.H, B = a.B;
        const Real* xp = a.xp + at(t, b, B, G * H, 0);
        const Real c_prev = t == 0 ? a.c0[(long long)b * H + j] : a.c[at(t - 1, b, B, H, j)];
        const Real i = sigmoid(xp[j] + hs[0]);             // input gate
        const Real f = sigmoid(xp[H + j] + hs[1]);         // forget gate
        const Real g = tanh_(xp[2 * H + j] + hs[2]);       // candidate cell
        const Real o = sigmoid(xp[3 * H + j] + hs[3]);     // output gate
        const Real c = f * c_prev + i * g;                 // new cell state
        const Real h = o * tanh_(c);                       // new hidden state
        Real* gt = a.gates + at(t, b, B, G * H, 0);
        gt[j] = i; gt[H + j] = f; gt[2 * H + j] = g; gt[3 * H + j] = o;
        a.c[at(t, b, B, H, j)] = c;
        a.y[at(t, b, B, H, j)] = h;
        return h;
    }
    BPTT_HD static void pad(const FwdArgs<Real>& a, int t, int b, int j) {
        Real* gt = a.gates + at(t, b, a.B, G * a.H, 0);
        for (int q = 0; q < G; ++q) gt[q * a.H + j] = Real(0);
        a.c[at(t, b, a.B, a.H, j)] = Real(0);
        a.y[at(t, b, a.B, a.H, j)] = Real(0);
    }
    BPTT_HD static void backward(const BwdArgs<Real>& a, int t, int b, int j, Real dh, Real& dc,
                                 Real& dh_direct, Real (&gh)[G]) {
        const int H = a.H, B = a.B;
        const Real* gt = a.gates + at(t, b, B, G * H, 0);
        const Real i = gt[j], f = gt[H + j], g = gt[2 * H + j], o = gt[3 * H + j];
        const Real c_prev = t == 0 ? a.c0[(long long)b * H + j] : a.c[at(t - 1, b, B, H, j)];
        const Real tc = tanh_(a.c[at(t, b, B, H, j)]);
        const Real dct = dc + dh * o * (Real(1) - tc * tc);  // total dL/dc_t
        gh[0] = dct * g * i * (Real(1) - i);                  // i: c = f*c_prev + i*g, sigmoid
        gh[1] = dct * c_prev * f * (Real(1) - f);             // f
        gh[2] = dct * i * (Real(1) - g * g);                  // g: tanh
        gh[3] = dh * tc * o * (Real(1) - o);                  // o: h = o*tanh(c), sigmoid
        dc = dct * f;                                         // to c_{t-1}
        dh_direct = Real(0);
        Real* dg = a.dgx + at(t, b, B, G * H, 0);
        for (int q = 0; q < G; ++q) dg[q * H + j] = gh[q];
    }
};

template <class Real>
struct Gru {
    static constexpr int G = 3;
    static constexpr bool separate_dgh = true;   // dgh differs from dgx in its n rows
    BPTT_HD static Real forward(const FwdArgs<Real>& a, int t, int b, int j, const Real (&hs)[G],
                                Real h_prev) {
        const int H = a.H, B = a.B;
        const Real* xp = a.xp + at(t, b, B, G * H, 0);
        const Real r = sigmoid(xp[j] + hs[0]);             // reset gate
        const Real z = sigmoid(xp[H + j] + hs[1]);         // update gate
        const Real n = tanh_(xp[2 * H + j] + r * hs[2]);   // candidate (hs[2] = W_hn h + b_hn)
        const Real h = (Real(1) - z) * n + z * h_prev;     // new hidden state
        Real* gt = a.gates + at(t, b, B, G * H, 0);
        gt[j] = r; gt[H + j] = z; gt[2 * H + j] = n;
        a.hn[at(t, b, B, H, j)] = hs[2];
        a.y[at(t, b, B, H, j)] = h;
        return h;
    }
    BPTT_HD static void pad(const FwdArgs<Real>& a, int t, int b, int j) {
        Real* gt = a.gates + at(t, b, a.B, G * a.H, 0);
        for (int q = 0; q < G; ++q) gt[q * a.H + j] = Real(0);
        a.hn[at(t, b, a.B, a.H, j)] = Real(0);
        a.y[at(t, b, a.B, a.H, j)] = Real(0);
    }
    BPTT_HD static void backward(const BwdArgs<Real>& a, int t, int b, int j, Real dh, Real& /*dc*/,
                                 Real& dh_direct, Real (&gh)[G]) {
        const int H = a.H, B = a.B;
        const Real* gt = a.gates + at(t, b, B, G * H, 0);
        const Real r = gt[j], z = gt[H + j], n = gt[2 * H + j];
        const Real hn = a.hn[at(t, b, B, H, j)];
        const Real h_prev = t == 0 ? a.h0[(long long)b * H + j] : a.y[at(t - 1, b, B, H, j)];
        const Real dan = dh * (Real(1) - z) * (Real(1) - n * n);  // n pre-activation, via tanh
        const Real dar = dan * hn * r * (Real(1) - r);           // r: n_pre = xn + r*hn
        const Real daz = dh * (h_prev - n) * z * (Real(1) - z);  // z: h = (1-z)n + z h_prev
        gh[0] = dar; gh[1] = daz; gh[2] = dan * r;               // hn enters times r
        dh_direct = dh * z;                                      // direct path to h_{t-1}
        Real* dgx = a.dgx + at(t, b, B, G * H, 0);
        Real* dgh = a.dgh + at(t, b, B, G * H, 0);
        dgx[j] = dar; dgx[H + j] = daz; dgx[2 * H + j] = dan;
        dgh[j] = dar; dgh[H + j] = daz; dgh[2 * H + j] = gh[2];
    }
};

template <class Real, bool Relu>
struct Rnn {
    static constexpr int G = 1;
    static constexpr bool separate_dgh = false;
    BPTT_HD static Real forward(const FwdArgs<Real>& a, int t, int b, int j, const Real (&hs)[G],
                                Real /*h_prev*/) {
        const Real pre = a.xp[at(t, b, a.B, a.H, j)] + hs[0];
        const Real h = Relu ? (pre > Real(0) ? pre : Real(0)) : tanh_(pre);
        a.y[at(t, b, a.B, a.H, j)] = h;
        return h;
    }
    BPTT_HD static void pad(const FwdArgs<Real>& a, int t, int b, int j) {
        a.y[at(t, b, a.B, a.H, j)] = Real(0);
    }
    BPTT_HD static void backward(const BwdArgs<Real>& a, int t, int b, int j, Real dh, Real& /*dc*/,
                                 Real& dh_direct, Real (&gh)[G]) {
        const Real h = a.y[at(t, b, a.B, a.H, j)];
        // act'(pre) from the output: relu 1 where h > 0 (PyTorch's choice at 0), tanh 1 - h^2
        gh[0] = Relu ? (h > Real(0) ? dh : Real(0)) : dh * (Real(1) - h * h);
        dh_direct = Real(0);
        a.dgx[at(t, b, a.B, a.H, j)] = gh[0];
    }
};

template <class Real> using RnnTanh = Rnn<Real, false>;
template <class Real> using RnnRelu = Rnn<Real, true>;

// Backward at a padded step t of row b (t >= steps[b]), unit j: dh and the gate gradients
// (dgx, and dgh for the GRU) written as zeros, gh zero; dc and dh_direct pass on unchanged.
template <class Cell, class Real>
BPTT_HD void pad_backward(const BwdArgs<Real>& a, int t, int b, int j, Real (&gh)[Cell::G]) {
    const int H = a.H, GH = Cell::G * a.H;
    a.dh[at(t, b, a.B, H, j)] = Real(0);
    for (int q = 0; q < Cell::G; ++q) {
        gh[q] = Real(0);
        a.dgx[at(t, b, a.B, GH, q * H + j)] = Real(0);
        if (Cell::separate_dgh) a.dgh[at(t, b, a.B, GH, q * H + j)] = Real(0);
    }
}

// Backward of unit j of row b at step t, in every path: a padded step's zeros, or the cell
// backward with total dL/dh_t = dy + (at the row's last step dh_final, else rec(): what came
// through W_hh from step t+1) + dh_direct. dc, dh_direct: the running values; gh out.
template <class Cell, class Real, class Rec>
BPTT_HD void backward_item(const BwdArgs<Real>& a, int t, int b, int j, const Rec& rec, Real& dc,
                           Real& dh_direct, Real (&gh)[Cell::G]) {
    if (!a.live(t, b)) {
        pad_backward<Cell>(a, t, b, j, gh);
        return;
    }
    const long long tj = at(t, b, a.B, a.H, j);
    const Real dh_rec = a.last(t, b) ? a.dh_final[(long long)b * a.H + j] : rec();
    const Real dh = a.dy[tj] + dh_rec + dh_direct;  // total dL/dh_t
    a.dh[tj] = dh;
    Cell::backward(a, t, b, j, dh, dc, dh_direct, gh);
}

// ---------------------------------------------------------------------------------------------
// General path: one fused kernel per step, one item per (b, j).

// hp [B,GH]: h_{t-1} @ w_hh^T (no bias); b_hh [GH].
template <class Cell, class Real, class Exec>
BPTT_HD void forward_step(const Exec& ex, const FwdArgs<Real>& a, int t, const Real* hp,
                          const Real* b_hh) {
    constexpr int G = Cell::G;
    const int H = a.H;
    const long long n = (long long)a.B * H;
    for (long long k = 0, m = ex.count(n); k < m; ++k) {
        const long long e = ex.item(k, n);
        const int b = (int)(e / H), j = (int)(e - (long long)b * H);
        if (!a.live(t, b)) {
            Cell::pad(a, t, b, j);
            continue;
        }
        Real hs[G];
        for (int q = 0; q < G; ++q) hs[q] = hp[(long long)b * G * H + q * H + j] + b_hh[q * H + j];
        const Real h_prev = t == 0 ? a.h0[e] : a.y[at(t - 1, b, a.B, H, j)];
        Cell::forward(a, t, b, j, hs, h_prev);
    }
}

// dh_rec [B,H]: dL/dh_t arriving through W_hh from step t+1 (not read at a row's last step,
// which takes a.dh_final); dc [B,H] in/out: LSTM dL/dc_t -> dL/dc_{t-1}; dh_direct [B,H]
// in/out: GRU z*dh path.
template <class Cell, class Real, class Exec>
BPTT_HD void backward_step(const Exec& ex, const BwdArgs<Real>& a, int t, const Real* dh_rec,
                           Real* dc, Real* dh_direct) {
    constexpr int G = Cell::G;
    const int H = a.H;
    const long long n = (long long)a.B * H;
    for (long long k = 0, m = ex.count(n); k < m; ++k) {
        const long long e = ex.item(k, n);
        const int b = (int)(e / H), j = (int)(e - (long long)b * H);
        Real gh[G];
        backward_item<Cell>(a, t, b, j, [&] { return dh_rec[e]; }, dc[e], dh_direct[e], gh);
    }
}

// ---------------------------------------------------------------------------------------------
// Persistent path: one block per `rows` batch rows, all steps in one launch.
// Each dot product over the hidden units is split in `splits` parts summed by different
// threads (splits * rows * H threads of work per phase), the parts are added in shared memory.

// Part s of n items split in `splits` near-equal ranges: [part_begin(s), part_begin(s + 1)).
BPTT_HD int part_begin(int s, int n, int splits) { return (int)((long long)s * n / splits); }

// Shared memory (Real elements): wt [H][GH] (W_hh transposed: threads j, j+1 read neighbouring
// words) + h [rows][H] (the block's hidden state) + part [splits][rows][GH] (partial sums).
// Per step: phase A, item (s, r, j): part[s][r][g*H + j] = sum over k in part s of
//   h[r][k] * W_hh[g*H + j][k]; phase B, item (r, j): hs = b_hh + sum of parts, cell forward.
template <class Cell, class Real, class Exec>
BPTT_HD void forward_persistent(const Exec& ex, Real* smem, const FwdArgs<Real>& a, int n_steps,
                                int rows, int splits, const Real* w_hh, const Real* b_hh) {
    constexpr int G = Cell::G;
    const int H = a.H, GH = G * a.H;
    const int b0 = ex.block() * rows;
    const int R = a.B - b0 < rows ? a.B - b0 : rows;  // rows of this block
    if (R <= 0) return;                                // whole block leaves together
    Real* wt = smem;                                   // H,GH
    Real* h = wt + (long long)GH * H;                  // rows,H
    Real* part = h + (long long)rows * H;              // splits,rows,GH
    const long long RH = (long long)R * H, SRH = (long long)splits * RH;
    for (long long k = 0, m = ex.count((long long)GH * H); k < m; ++k) {
        const long long e = ex.item(k, (long long)GH * H);
        const long long gj = e / H, kk = e - gj * H;
        wt[kk * GH + gj] = w_hh[e];                    // w_hh [GH,H] -> wt [H,GH]
    }
    for (long long k = 0, m = ex.count(RH); k < m; ++k) {
        const long long e = ex.item(k, RH);
        h[e] = a.h0[(long long)b0 * H + e];
    }
    ex.sync();
    for (int t = 0; t < n_steps; ++t) {
        // phase A: partial sums of h_{t-1} W_hh^T
        for (long long k = 0, m = ex.count(SRH); k < m; ++k) {
            const long long e = ex.item(k, SRH);
            const int s = (int)(e / RH);
            const int r = (int)((e - s * RH) / H), j = (int)(e - s * RH - (long long)r * H);
            const Real* hr = h + (long long)r * H;
            Real acc[G];
            for (int q = 0; q < G; ++q) acc[q] = Real(0);
            for (int kk = part_begin(s, H, splits), k1 = part_begin(s + 1, H, splits); kk < k1; ++kk) {
                const Real hk = hr[kk];
                const Real* w = wt + (long long)kk * GH + j;
                for (int q = 0; q < G; ++q) acc[q] += w[q * H] * hk;
            }
            Real* p = part + ((long long)s * rows + r) * GH + j;
            for (int q = 0; q < G; ++q) p[q * H] = acc[q];
        }
        ex.sync();
        // phase B: gates and new state of every (r, j)
        for (long long k = 0, m = ex.count(RH); k < m; ++k) {
            const long long e = ex.item(k, RH);
            const int r = (int)(e / H), j = (int)(e - (long long)r * H);
            if (!a.live(t, b0 + r)) {
                Cell::pad(a, t, b0 + r, j);                    // h[e] kept
                continue;
            }
            Real hs[G];
            for (int q = 0; q < G; ++q) {
                hs[q] = b_hh[q * H + j];
                for (int s = 0; s < splits; ++s) hs[q] += part[((long long)s * rows + r) * GH + q * H + j];
            }
            h[e] = Cell::forward(a, t, b0 + r, j, hs, h[e]);  // item e alone reads/writes h[e]
        }
        ex.sync();
    }
}

// Shared memory (Real elements): w [GH][H] (W_hh as is: threads k, k+1 read neighbours in
// dh = dg @ W_hh) + dg [rows][GH] + part [splits][rows][H] (partial sums of dh_rec)
// + dc, dh_direct [rows][H]. Per step: phase A, item (r, j): dh_rec = sum of parts (a.dh_final
// at the row's last step: the parts are first written at step T-1), gate gradients; phase B,
// item (s, r, k): part[s][r][k] = sum over gj in part s of dg[r][gj] W[gj][k].
// dc_final [B,H]: dL/dc_T; dh0, dc0 [B,H] out: gradients into the state entering step t_start
// (dc0 is zero for non-LSTM cells; the engine puts dh_final in dh0 for rows with no step left).
template <class Cell, class Real, class Exec>
BPTT_HD void backward_persistent(const Exec& ex, Real* smem, const BwdArgs<Real>& a,
                                 int n_steps, int t_start, int rows, int splits,
                                 const Real* w_hh, const Real* dc_final, Real* dh0, Real* dc0) {
    constexpr int G = Cell::G;
    const int H = a.H, GH = G * a.H;
    const int b0 = ex.block() * rows;
    const int R = a.B - b0 < rows ? a.B - b0 : rows;
    if (R <= 0) return;
    Real* w = smem;                                  // GH,H
    Real* dg = w + (long long)GH * H;                // rows,GH  gh of this step
    Real* part = dg + (long long)rows * GH;          // splits,rows,H  parts of dL/dh through W_hh
    Real* dc = part + (long long)splits * rows * H;  // rows,H   running dL/dc
    Real* dh_dir = dc + (long long)rows * H;         // rows,H   GRU direct path
    const long long RH = (long long)R * H, SRH = (long long)splits * RH;
    const long long base = (long long)b0 * H;
    for (long long k = 0, m = ex.count((long long)GH * H); k < m; ++k) {
        const long long e = ex.item(k, (long long)GH * H);
        w[e] = w_hh[e];
    }
    for (long long k = 0, m = ex.count(RH); k < m; ++k) {
        const long long e = ex.item(k, RH);
        dc[e] = dc_final[base + e];
        dh_dir[e] = Real(0);
    }
    ex.sync();
    for (int t = n_steps - 1; t >= t_start; --t) {
        // phase A: gate gradients of every (r, j)
        for (long long k = 0, m = ex.count(RH); k < m; ++k) {
            const long long e = ex.item(k, RH);
            const int r = (int)(e / H), j = (int)(e - (long long)r * H);
            const auto parts = [&] {
                Real sum = Real(0);
                for (int s = 0; s < splits; ++s) sum += part[(long long)s * rows * H + e];
                return sum;
            };
            Real gh[G];
            backward_item<Cell>(a, t, b0 + r, j, parts, dc[e], dh_dir[e], gh);
            for (int q = 0; q < G; ++q) dg[(long long)r * GH + q * H + j] = gh[q];
        }
        ex.sync();
        // phase B: partial sums of dg @ W_hh, to h_{t-1}
        for (long long k = 0, m = ex.count(SRH); k < m; ++k) {
            const long long e = ex.item(k, SRH);
            const int s = (int)(e / RH);
            const int r = (int)((e - s * RH) / H), kk = (int)(e - s * RH - (long long)r * H);
            const Real* dgr = dg + (long long)r * GH;
            Real acc = Real(0);
            for (int gj = part_begin(s, GH, splits), g1 = part_begin(s + 1, GH, splits); gj < g1; ++gj)
                acc += dgr[gj] * w[(long long)gj * H + kk];
            part[(long long)s * rows * H + (long long)r * H + kk] = acc;
        }
        ex.sync();
    }
    for (long long k = 0, m = ex.count(RH); k < m; ++k) {
        const long long e = ex.item(k, RH);
        Real dh_rec = Real(0);
        for (int s = 0; s < splits; ++s) dh_rec += part[(long long)s * rows * H + e];
        dh0[base + e] = dh_rec + dh_dir[e];
        dc0[base + e] = dc[e];
    }
}

// ---------------------------------------------------------------------------------------------
// Cooperative path: block p owns units j0 = p*U .. j0 + Ub - 1 (Ub = U, fewer in the last
// block) of all B rows; one grid barrier per step. Every thread of every block runs every
// barrier (no early return). Row strides of the weight tables are odd: threads whose table
// rows differ then read different banks.

BPTT_HD int odd_stride(int n) { return n | 1; }

// Shared memory (Real elements): w [H][odd(G*U)] (w[k][q*U + u] = W_hh[q*H + j0 + u][k])
// + h [B][H] (h_{t-1} of every row and unit) + part [splits][B][G*U] (partial sums).
// Per step: load h_{t-1} (written by every block); phase A, item (s, r, u): the block's
// G*U dot products of row r over the k of part s; phase B, item (r, u): hs = b_hh + sum of
// parts, cell forward (writes y[t], the cache); grid barrier.
template <class Cell, class Real, class Exec>
BPTT_HD void forward_cooperative(const Exec& ex, Real* smem, const FwdArgs<Real>& a, int n_steps,
                                 int U, int splits, const Real* w_hh, const Real* b_hh) {
    constexpr int G = Cell::G;
    const int H = a.H, B = a.B, GU = G * U, WS = odd_stride(G * U);
    const int j0 = ex.block() * U;
    const int Ub = H - j0 < U ? H - j0 : U;           // units of this block (>= 1)
    Real* w = smem;                                    // H,WS
    Real* h = w + (long long)H * WS;                   // B,H
    Real* part = h + (long long)B * H;                 // splits,B,GU
    const long long nw = (long long)G * Ub * H, BH = (long long)B * H;
    for (long long k = 0, m = ex.count(nw); k < m; ++k) {
        const long long e = ex.item(k, nw);
        const int qu = (int)(e / H), kk = (int)(e - (long long)qu * H);
        const int q = qu / Ub, u = qu - q * Ub;
        w[(long long)kk * WS + q * U + u] = w_hh[((long long)q * H + j0 + u) * H + kk];
    }
    const long long BU = (long long)B * Ub, SBU = (long long)splits * BU;
    for (int t = 0; t < n_steps; ++t) {
        const Real* hg = t == 0 ? a.h0 : a.y + (long long)(t - 1) * BH;  // B,H  h_{t-1}
        for (long long k = 0, m = ex.count(BH); k < m; ++k) {
            const long long e = ex.item(k, BH);
            h[e] = ldcg(hg + e);
        }
        ex.sync();
        // phase A: partial sums of h_{t-1} W_hh^T for the block's units
        for (long long k = 0, m = ex.count(SBU); k < m; ++k) {
            const long long e = ex.item(k, SBU);
            const int s = (int)(e / BU);
            const int r = (int)((e - s * BU) / Ub), u = (int)(e - s * BU - (long long)r * Ub);
            const Real* hr = h + (long long)r * H;
            Real acc[G];
            for (int q = 0; q < G; ++q) acc[q] = Real(0);
            for (int kk = part_begin(s, H, splits), k1 = part_begin(s + 1, H, splits); kk < k1; ++kk) {
                const Real hk = hr[kk];
                const Real* wk = w + (long long)kk * WS + u;
                for (int q = 0; q < G; ++q) acc[q] += wk[q * U] * hk;
            }
            Real* p = part + ((long long)s * B + r) * GU + u;
            for (int q = 0; q < G; ++q) p[q * U] = acc[q];
        }
        ex.sync();
        // phase B: gates and new state of the block's (r, u)
        for (long long k = 0, m = ex.count(BU); k < m; ++k) {
            const long long e = ex.item(k, BU);
            const int r = (int)(e / Ub), u = (int)(e - (long long)r * Ub), j = j0 + u;
            if (!a.live(t, r)) {
                Cell::pad(a, t, r, j);
                continue;
            }
            Real hs[G];
            for (int q = 0; q < G; ++q) {
                hs[q] = b_hh[q * H + j];
                for (int s = 0; s < splits; ++s) hs[q] += part[((long long)s * B + r) * GU + q * U + u];
            }
            Cell::forward(a, t, r, j, hs, h[(long long)r * H + j]);
        }
        ex.grid_sync();  // y[t] complete: the next step's h
    }
}

// Shared memory (Real elements): w [GH][odd(U)] (w[gj][u] = W_hh[gj][j0 + u]) + dg [B][H]
// (one gate's rows of the step's dL/d(h W_hh^T), all units) + part [splits][B][U] (partial
// sums of dL/dh through W_hh) + dc, dh_direct [B][U]. Per step: phase A, item (r, u): total
// dL/dh_t, cell backward (writes dh, dgx, dgh of step t); grid barrier; phase B, thread
// (s, r, u) of splits*B*U: for each gate q, load that gate's rows of every unit, add
// sum over k in part s of dg[r][q*H + k] * W_hh[q*H + k][j]. dg_rec [T,B,GH]: the rows that
// multiply W_hh (dgh for the GRU, dgx otherwise). dc_final [B,H]; dh0, dc0 [B,H] out (as in
// backward_persistent, whose phase A this one's shares: backward_item).
template <class Cell, class Real, class Exec>
BPTT_HD void backward_cooperative(const Exec& ex, Real* smem, const BwdArgs<Real>& a,
                                  const Real* dg_rec, int n_steps, int t_start, int U, int splits,
                                  const Real* w_hh, const Real* dc_final, Real* dh0, Real* dc0) {
    constexpr int G = Cell::G;
    const int H = a.H, B = a.B, GH = G * a.H, US = odd_stride(U);
    const int j0 = ex.block() * U;
    const int Ub = H - j0 < U ? H - j0 : U;
    Real* w = smem;                                    // GH,US
    Real* dg = w + (long long)GH * US;                 // B,H
    Real* part = dg + (long long)B * H;                // splits,B,U
    Real* dc = part + (long long)splits * B * U;       // B,U  running dL/dc
    Real* dh_dir = dc + (long long)B * U;              // B,U  GRU direct path
    const long long BU = (long long)B * Ub, SBU = (long long)splits * BU, BH = (long long)B * H;
    for (long long k = 0, m = ex.count((long long)GH * Ub); k < m; ++k) {
        const long long e = ex.item(k, (long long)GH * Ub);
        const long long gj = e / Ub;
        const int u = (int)(e - gj * Ub);
        w[gj * US + u] = w_hh[gj * H + j0 + u];
    }
    for (long long k = 0, m = ex.count(BU); k < m; ++k) {
        const long long e = ex.item(k, BU);
        const int r = (int)(e / Ub), u = (int)(e - (long long)r * Ub);
        dc[r * U + u] = dc_final[(long long)r * H + j0 + u];
        dh_dir[r * U + u] = Real(0);
    }
    // this thread's item of phase B (the engine launches at least splits*B*U threads)
    const int me = ex.tid();
    const bool active = me < SBU;
    const int ms = (int)(me / BU);
    const int mr = (int)((me - ms * BU) / Ub), mu = (int)(me - ms * BU - (long long)mr * Ub);
    ex.sync();
    for (int t = n_steps - 1; t >= t_start; --t) {
        // phase A: gate gradients of the block's (r, u)
        for (long long k = 0, m = ex.count(BU); k < m; ++k) {
            const long long e = ex.item(k, BU);
            const int r = (int)(e / Ub), u = (int)(e - (long long)r * Ub), j = j0 + u;
            const auto parts = [&] {
                Real sum = Real(0);
                for (int s = 0; s < splits; ++s) sum += part[((long long)s * B + r) * U + u];
                return sum;
            };
            Real gh[G];
            backward_item<Cell>(a, t, r, j, parts, dc[r * U + u], dh_dir[r * U + u], gh);
        }
        ex.grid_sync();  // every unit's gate gradients of step t written
        // phase B: dL/dh_{t-1} of the block's units through W_hh, one gate's rows at a time
        Real acc = Real(0);
        for (int q = 0; q < G; ++q) {
            const Real* src = dg_rec + at(t, 0, B, GH, q * H);
            for (long long k = 0, m = ex.count(BH); k < m; ++k) {
                const long long e = ex.item(k, BH);
                const long long r = e / H;
                dg[e] = ldcg(src + r * GH + (e - r * H));
            }
            ex.sync();
            if (active) {
                const Real* dgr = dg + (long long)mr * H;
                for (int kk = part_begin(ms, H, splits), k1 = part_begin(ms + 1, H, splits); kk < k1; ++kk)
                    acc += dgr[kk] * w[((long long)q * H + kk) * US + mu];
            }
            ex.sync();
        }
        if (active) part[((long long)ms * B + mr) * U + mu] = acc;
        ex.sync();
    }
    for (long long k = 0, m = ex.count(BU); k < m; ++k) {
        const long long e = ex.item(k, BU);
        const int r = (int)(e / Ub), u = (int)(e - (long long)r * Ub);
        Real dh_rec = Real(0);
        for (int s = 0; s < splits; ++s) dh_rec += part[((long long)s * B + r) * U + u];
        dh0[(long long)r * H + j0 + u] = dh_rec + dh_dir[r * U + u];
        dc0[(long long)r * H + j0 + u] = dc[r * U + u];
    }
}

}  // namespace bptt

// ---------------------------------------------------------------------------------------------
// Entry points (extern "C": the names the Python side launches; bptt_kernels.cupy._compile
// lists them). Step kernels: 256 threads, grid-stride. Persistent: up to 1024 threads/block.
// Compiled with -DBPTT_SELECT -DBPTT_SELECT_<cell>_<f32|f64>, a source yields only that cell's
// and dtype's kernels (the backend compiles what a run uses: a fraction of the cold-start time).

#define BPTT_RECURRENT_KERNELS(NAME, CELL, SFX, Real)                                         \
    BPTT_KERNEL(NAME##_forward_step_##SFX, 256)(                                              \
        int t, int B, int H, const int* steps, const Real* xp, const Real* hp,                \
        const Real* b_hh, const Real* h0, const Real* c0, Real* y, Real* c, Real* gates,      \
        Real* hn) {                                                                           \
        BPTT_GRID_EXEC(ex)                                                                    \
        const bptt::FwdArgs<Real> a{B, H, steps, xp, h0, c0, y, c, gates, hn};                \
        bptt::forward_step<CELL>(ex, a, t, hp, b_hh);                                         \
    }                                                                                         \
    BPTT_KERNEL(NAME##_backward_step_##SFX, 256)(                                             \
        int t, int B, int H, const int* steps, const Real* dy, const Real* dh_rec,            \
        const Real* dh_final, const Real* h0, const Real* c0, const Real* y, const Real* c,   \
        const Real* gates, const Real* hn, Real* dh, Real* dgx, Real* dgh, Real* dc,          \
        Real* dh_direct) {                                                                    \
        BPTT_GRID_EXEC(ex)                                                                    \
        const bptt::BwdArgs<Real> a{B, H, steps, dy, h0, c0, y, c, gates, hn, dh_final, dh,  \
                                    dgx, dgh};                                                \
        bptt::backward_step<CELL>(ex, a, t, dh_rec, dc, dh_direct);                           \
    }                                                                                         \
    BPTT_KERNEL(NAME##_forward_persistent_##SFX, 1024)(                                       \
        int n_steps, int B, int H, int rows, int splits, const int* steps, const Real* xp,    \
        const Real* w_hh, const Real* b_hh, const Real* h0, const Real* c0, Real* y, Real* c, \
        Real* gates, Real* hn) {                                                              \
        const bptt::FwdArgs<Real> a{B, H, steps, xp, h0, c0, y, c, gates, hn};                \
        BPTT_BLOCKS_BEGIN(ex, smem, Real)                                                     \
        bptt::forward_persistent<CELL>(ex, smem, a, n_steps, rows, splits, w_hh, b_hh);       \
        BPTT_BLOCKS_END                                                                       \
    }                                                                                         \
    BPTT_KERNEL(NAME##_backward_persistent_##SFX, 1024)(                                      \
        int n_steps, int t_start, int B, int H, int rows, int splits, const int* steps,       \
        const Real* dy, const Real* w_hh,                                                     \
        const Real* h0, const Real* c0, const Real* y, const Real* c, const Real* gates,      \
        const Real* hn, const Real* dh_final, const Real* dc_final, Real* dh, Real* dgx,      \
        Real* dgh, Real* dh0, Real* dc0) {                                                    \
        const bptt::BwdArgs<Real> a{B, H, steps, dy, h0, c0, y, c, gates, hn, dh_final, dh,  \
                                    dgx, dgh};                                                \
        BPTT_BLOCKS_BEGIN(ex, smem, Real)                                                     \
        bptt::backward_persistent<CELL>(ex, smem, a, n_steps, t_start, rows, splits, w_hh,    \
                                        dc_final, dh0, dc0);                                  \
        BPTT_BLOCKS_END                                                                       \
    }                                                                                         \
    BPTT_KERNEL(NAME##_forward_cooperative_##SFX, 1024)(                                      \
        int n_steps, int B, int H, int units, int splits, const int* steps, const Real* xp,   \
        const Real* w_hh, const Real* b_hh, const Real* h0, const Real* c0, Real* y, Real* c, \
        Real* gates, Real* hn, unsigned int* barrier) {                                       \
        const bptt::FwdArgs<Real> a{B, H, steps, xp, h0, c0, y, c, gates, hn};                \
        BPTT_GRID_BEGIN(ex, smem, Real, barrier)                                              \
        bptt::forward_cooperative<CELL>(ex, smem, a, n_steps, units, splits, w_hh, b_hh);     \
        BPTT_GRID_END                                                                         \
    }                                                                                         \
    BPTT_KERNEL(NAME##_backward_cooperative_##SFX, 1024)(                                     \
        int n_steps, int t_start, int B, int H, int units, int splits, const int* steps,      \
        const Real* dy, const Real* w_hh,                                                     \
        const Real* h0, const Real* c0, const Real* y, const Real* c, const Real* gates,      \
        const Real* hn, const Real* dh_final, const Real* dc_final, Real* dh, Real* dgx,      \
        Real* dgh, Real* dh0, Real* dc0, unsigned int* barrier) {                             \
        const bptt::BwdArgs<Real> a{B, H, steps, dy, h0, c0, y, c, gates, hn, dh_final, dh,  \
                                    dgx, dgh};                                                \
        const Real* dg_rec = CELL::separate_dgh ? dgh : dgx;  /* rows times W_hh */       \
        BPTT_GRID_BEGIN(ex, smem, Real, barrier)                                              \
        bptt::backward_cooperative<CELL>(ex, smem, a, dg_rec, n_steps, t_start, units,        \
                                         splits, w_hh, dc_final, dh0, dc0);                   \
        BPTT_GRID_END                                                                         \
    }

#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_lstm_f32)
BPTT_RECURRENT_KERNELS(lstm, bptt::Lstm<float>, f32, float)
#endif
#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_lstm_f64)
BPTT_RECURRENT_KERNELS(lstm, bptt::Lstm<double>, f64, double)
#endif
#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_gru_f32)
BPTT_RECURRENT_KERNELS(gru, bptt::Gru<float>, f32, float)
#endif
#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_gru_f64)
BPTT_RECURRENT_KERNELS(gru, bptt::Gru<double>, f64, double)
#endif
#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_rnn_tanh_f32)
BPTT_RECURRENT_KERNELS(rnn_tanh, bptt::RnnTanh<float>, f32, float)
#endif
#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_rnn_tanh_f64)
BPTT_RECURRENT_KERNELS(rnn_tanh, bptt::RnnTanh<double>, f64, double)
#endif
#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_rnn_relu_f32)
BPTT_RECURRENT_KERNELS(rnn_relu, bptt::RnnRelu<float>, f32, float)
#endif
#if !defined(BPTT_SELECT) || defined(BPTT_SELECT_rnn_relu_f64)
BPTT_RECURRENT_KERNELS(rnn_relu, bptt::RnnRelu<double>, f64, double)
#endif
