// Fused interior-point iterations of dqp's batched IPM, dual form, float64 (dqp.solvers.fused).
//
// One thread block solves one QP: every iteration (residuals, convergence check and infeasibility
// certificates, the Schur-complement factorization S = Ā P⁻¹ Āᵀ + diag(0, W⁻¹) + δI, predictor,
// corrector, step) runs inside one launch, with S and the iterate in shared memory. It is the
// same algorithm as the torch loop of solvers/ipm.py (its `_step` and `_check`, checked every
// iteration), which stays the reference: tests compare the two.
//
// The source also compiles as plain C++ with -DDQP_CPU: a "block" is then one thread
// (TID = 0, NT = 1, WARP = 1), barriers are no-ops and block reductions are identities, so each
// parallel loop runs sequentially over its whole range. CI compiles it that way to test the
// logic without a GPU, and also with -DDQP_CPU_THREADS (a test build, below: a block of real
// threads, warps of 32 lanes with their shuffles emulated, so that multi-warp logic and races
// show). Rules that keep both builds right: parallel work only in loops of the form
// `for (i = TID; i < N; i += NT)` (or over warps/lanes), values that cross a barrier live in
// shared memory, and reductions go through block_reduce().
//
// The host side prepends #define lines for the Status codes (ST_SOLVED, ...).

#ifdef DQP_CPU
#include <cmath>
#include <cstdlib>
#define KERNEL static void
#define DEV static inline
static thread_local int dqp_block_id = 0;
static thread_local double* dqp_smem = nullptr;
#ifdef DQP_CPU_THREADS
// A test build (tests/test_fused.py): one block is DQP_THREADS real threads (warps of 32 lanes,
// NT/32 warps), so that CI runs the CUDA code's logic with several warps and lanes:
// dqp_ipm_dual_threads (the whole kernel) and dqp_chol_upper_threads (factorization and solve)
// at the end of the file. The warp-level primitives (warp_sum, warp_max, DQP_SHFL, SYNCWARP) are
// emulated per warp: a lane writes its value to its warp's exchange buffer, waits at its warp's
// barrier of 32 threads and reads what it needs (all 32 values for the butterflies, computed
// exactly as the CUDA lanes do, in the same order). Each warp alternates two buffers: a lane
// writes a buffer again only two exchanges later, after the next exchange's barrier, which every
// lane reaches only once it has read this one (so one barrier per exchange cannot race).
// Schedules (dqp_threads_schedule): 0, the OS runs the threads at once (std::barrier for the block
// and per warp); ±1, one thread at a time, handing over only at barriers, the runnable thread of
// lowest (+1) or highest (−1) index next. The serialized schedules make races deterministic: a
// value read without a barrier after another thread's write is then always stale in one of the two
// orders. There a deadlock (lanes that diverge on a warp-level primitive, undefined with the full
// mask on CUDA; threads that skip a barrier) aborts with a message; with 0 it hangs.
#include <barrier>
#include <condition_variable>
#include <cstdio>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>
static int dqp_schedule = 0;
struct DqpTurn {            // a binary semaphore: give() hands the turn over, take() waits for it
    std::mutex m;
    std::condition_variable cv;
    bool ready = false;
    void give() {
        { std::lock_guard<std::mutex> lock(m); ready = true; }
        cv.notify_one();
    }
    void take() {
        std::unique_lock<std::mutex> lock(m);
        cv.wait(lock, [this] { return ready; });
        ready = false;
    }
};
extern "C" void dqp_threads_schedule(int order) { dqp_schedule = order; }
struct DqpBlock {           // what the threads of one block share, besides dqp_smem
    const int order = dqp_schedule;
    std::barrier<> bar{DQP_THREADS};
    std::vector<std::unique_ptr<std::barrier<>>> wbar;   // one per warp, 32 threads each
    double xbuf[DQP_THREADS / 32][2][32];
    // the serialized schedules: the running thread owns these (handed over by the turns)
    std::vector<std::unique_ptr<DqpTurn>> go;   // per thread: its turn
    std::vector<int> at;       // per thread: −1 runnable, −2 finished, b ≥ 0 waiting at barrier b
    std::vector<int> arrived;  // per barrier (0: the block's, 1 + w: warp w's): threads arrived
    DqpBlock() : at(DQP_THREADS, -1), arrived(1 + DQP_THREADS / 32, 0) {
        for (int w = 0; w < DQP_THREADS / 32; ++w) wbar.emplace_back(new std::barrier<>(32));
        for (int t = 0; t < DQP_THREADS; ++t) go.emplace_back(new DqpTurn());
    }
    int next() const {         // the runnable thread that runs next (−1: none)
        for (int i = 0; i < DQP_THREADS; ++i) {
            const int t = order > 0 ? i : DQP_THREADS - 1 - i;
            if (at[t] == -1) return t;
        }
        return -1;
    }
};
static thread_local int dqp_tid = 0;
static thread_local DqpBlock* dqp_blk = nullptr;
static thread_local int dqp_xpar = 0;      // which of its warp's two buffers the lane uses next
// (serialized schedules) hand the turn to the next runnable thread; return when it is ours again
static void dqp_yield(DqpBlock* k) {
    const int t = k->next();
    if (t < 0) {
        bool all_done = true;
        for (int u = 0; u < DQP_THREADS; ++u) all_done = all_done && k->at[u] == -2;
        if (all_done) return;
        std::fprintf(stderr, "dqp threaded kernel: deadlock (thread %d at barrier %d; 0 = block, 1 + w = warp w)\n",
                     dqp_tid, k->at[dqp_tid]);
        std::abort();
    }
    if (t == dqp_tid) return;
    const bool done = k->at[dqp_tid] == -2;     // (read before the turn passes: then t owns k)
    k->go[t]->give();
    if (!done) k->go[dqp_tid]->take();
}
// barrier b (0: the block's, 1 + w: warp w's)
static void dqp_barrier(int b) {
    DqpBlock* k = dqp_blk;
    if (k->order == 0) {
        (b == 0 ? k->bar : *k->wbar[b - 1]).arrive_and_wait();
        return;
    }
    if (++k->arrived[b] == (b == 0 ? DQP_THREADS : 32)) {
        k->arrived[b] = 0;
        for (int u = 0; u < DQP_THREADS; ++u)
            if (k->at[u] == b) k->at[u] = -1;
    } else {
        k->at[dqp_tid] = b;
    }
    dqp_yield(k);
}
#define TID dqp_tid
#define NT DQP_THREADS
#define WARP 32
#define SYNC() dqp_barrier(0)
#define SYNCWARP() dqp_barrier(1 + dqp_tid / 32)
// every lane of the warp publishes v; returns the warp's 32 values (valid until its next exchange)
static inline const double* dqp_exchange(double v) {
    const int w = dqp_tid / 32;
    double* buf = dqp_blk->xbuf[w][dqp_xpar];
    dqp_xpar ^= 1;
    buf[dqp_tid % 32] = v;
    dqp_barrier(1 + w);
    return buf;
}
// the xor butterflies of the CUDA warp_sum/warp_max below, every lane's value at every round
// (u[l] is lane l's v), so each lane gets exactly what its CUDA lane would
static inline double dqp_butterfly(double v, bool is_max) {
    const double* buf = dqp_exchange(v);
    double u[32], t[32];
    for (int l = 0; l < 32; ++l) u[l] = buf[l];
    for (int o = 16; o > 0; o >>= 1) {
        for (int l = 0; l < 32; ++l) t[l] = is_max ? std::fmax(u[l], u[l ^ o]) : u[l] + u[l ^ o];
        for (int l = 0; l < 32; ++l) u[l] = t[l];
    }
    return u[dqp_tid % 32];
}
static inline double warp_sum(double v) { return dqp_butterfly(v, false); }
static inline double warp_max(double v) { return dqp_butterfly(v, true); }
// __shfl_sync(full mask, v, src): lane src's v
static inline double dqp_shfl(double v, int src) { return dqp_exchange(v)[src & 31]; }
#define DQP_SHFL(v, src) dqp_shfl((v), (src))
#else
#define TID 0
#define NT 1
#define WARP 1
#define SYNC() ((void)0)
#define SYNCWARP() ((void)0)
#endif
#define BID dqp_block_id
#define DQP_SQRT std::sqrt
#define DQP_ISFINITE std::isfinite
#define DQP_RCP(x) (1.0 / (x))
#ifndef DQP_CPU_THREADS
DEV double warp_sum(double v) { return v; }
DEV double warp_max(double v) { return v; }
#endif
#else
#ifndef DQP_THREADS
#define DQP_THREADS 384       // (the host always defines it: dqp.solvers.fused.THREADS)
#endif
#define KERNEL extern "C" __global__ void __launch_bounds__(DQP_THREADS)
#define DEV __device__ __forceinline__
extern __shared__ double dqp_smem[];
#define TID ((int)threadIdx.x)
// (the launch has exactly DQP_THREADS threads, dqp.solvers.fused: with a compile-time block size,
// arithmetic on the warp count compiles to shifts and multiplies; with blockDim.x the
// factorization's row-owner test was an integer division, ~6 % of the stall samples, Nsight Compute)
#define NT DQP_THREADS
#define WARP 32
#define BID ((long long)blockIdx.x)
#define SYNC() __syncthreads()
#define SYNCWARP() __syncwarp()
#define DQP_SQRT sqrt
#define DQP_ISFINITE isfinite
#define DQP_RCP(x) __drcp_rn(x)      // = 1.0 / x (both correctly rounded), without division's slow-path branch
DEV double warp_sum(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
DEV double warp_max(double v) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
#endif

// -DDQP_PROFILE: thread 0 of each block adds the clock cycles of
// each phase of an iteration to prof[phase] (atomically, over all blocks).
#if defined(DQP_PROFILE) && !defined(DQP_CPU)
#define PROF_INIT long long prof_t = clock64();
#define PROF(ph) if (TID == 0 && prof) { const long long t_ = clock64(); atomicAdd((unsigned long long*)&prof[ph], (unsigned long long)(t_ - prof_t)); prof_t = t_; }
#else
#define PROF_INIT
#define PROF(ph)
#endif

#define LANE (TID % WARP)
#define WID (TID / WARP)
#define NWARPS (NT / WARP)

#define DQP_TINY 2.2250738585072014e-308
#define DQP_BIG 1.7e308
#ifndef MAXRED
#define MAXRED 40      // (the host defines it: dqp.solvers.fused._MAXRED)
#endif

// Reduce ns sums and nx maxima over the block; every thread gets the totals back in place.
// red: shared scratch of (NWARPS + 1) * MAXRED doubles.
DEV void block_reduce(double* sums, int ns, double* maxs, int nx, double* red) {
#if !defined(DQP_CPU) || defined(DQP_CPU_THREADS)
    const int nv = ns + nx;
    for (int j = 0; j < ns; ++j) sums[j] = warp_sum(sums[j]);
    for (int j = 0; j < nx; ++j) maxs[j] = warp_max(maxs[j]);
    // (no barrier needed here: the previous call's last reads of the per-warp slots came before its
    // final barrier, and its readers of the totals' slots pass this call's next barrier before
    // anything writes them again — the threaded CPU build checks this under serialized schedules)
    if (LANE == 0) {
        for (int j = 0; j < ns; ++j) red[WID * MAXRED + j] = sums[j];
        for (int j = 0; j < nx; ++j) red[WID * MAXRED + ns + j] = maxs[j];
    }
    SYNC();
    if (TID < nv) {
        double acc = red[TID];
        for (int w = 1; w < NWARPS; ++w) {
            double v = red[w * MAXRED + TID];
            acc = TID < ns ? acc + v : fmax(acc, v);
        }
        red[NWARPS * MAXRED + TID] = acc;
    }
    SYNC();
    for (int j = 0; j < ns; ++j) sums[j] = red[NWARPS * MAXRED + j];
    for (int j = 0; j < nx; ++j) maxs[j] = red[NWARPS * MAXRED + ns + j];
#else
    (void)sums; (void)ns; (void)maxs; (void)nx; (void)red;
#endif
}

DEV double dmax(double a, double b) { return a > b ? a : b; }
DEV double dmin(double a, double b) { return a < b ? a : b; }
DEV double dabs(double a) { return a < 0 ? -a : a; }

// y[r] = Σ_c M[r, c] x[c] for a row-major rows×cols matrix in global memory (leading dimension
// ld); a warp takes 4 rows at a time, so that each lane has 4 independent loads in flight.
DEV void matvec(const double* __restrict__ M, int rows, int cols, int ld, const double* x, double* y) {
    for (int r0 = WID * 4; r0 < rows; r0 += NWARPS * 4) {
        const int r1 = r0 + 1 < rows ? r0 + 1 : rows - 1;
        const int r2 = r0 + 2 < rows ? r0 + 2 : rows - 1;
        const int r3 = r0 + 3 < rows ? r0 + 3 : rows - 1;
        const double *m0 = M + (long long)r0 * ld, *m1 = M + (long long)r1 * ld;
        const double *m2 = M + (long long)r2 * ld, *m3 = M + (long long)r3 * ld;
        double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0;
        for (int c = LANE; c < cols; c += WARP) {
            const double xc = x[c];
            a0 += m0[c] * xc; a1 += m1[c] * xc; a2 += m2[c] * xc; a3 += m3[c] * xc;
        }
        a0 = warp_sum(a0); a1 = warp_sum(a1); a2 = warp_sum(a2); a3 = warp_sum(a3);
        if (LANE == 0) {
            y[r0] = a0;
            if (r0 + 1 < rows) y[r0 + 1] = a1;
            if (r0 + 2 < rows) y[r0 + 2] = a2;
            if (r0 + 3 < rows) y[r0 + 3] = a3;
        }
    }
}

#define TCH 4
// y[c] = Σ_r M[r, c] x[r] (Mᵀx) for M in global memory: each warp sums its share of the rows
// (coalesced row reads, TCH columns per lane), then the warps' partial sums (scratch: NWARPS·cols
// doubles of shared memory) are added. Ends with a barrier.
DEV void matvec_t(const double* __restrict__ M, int rows, int cols, int ld, const double* x, double* y,
                  double* scratch) {
    for (int c0 = 0; c0 < cols; c0 += WARP * TCH) {
        double acc[TCH];
        for (int t = 0; t < TCH; ++t) acc[t] = 0.0;
        for (int r = WID; r < rows; r += NWARPS) {
            const double xr = x[r];
            const double* row = M + (long long)r * ld;
            for (int t = 0; t < TCH; ++t) {
                const int c = c0 + LANE + t * WARP;
                if (c < cols) acc[t] += row[c] * xr;
            }
        }
        for (int t = 0; t < TCH; ++t) {
            const int c = c0 + LANE + t * WARP;
            if (c < cols) scratch[WID * cols + c] = acc[t];
        }
    }
    SYNC();
    for (int c = TID; c < cols; c += NT) {
        double v = 0.0;
        for (int w = 0; w < NWARPS; ++w) v += scratch[w * cols + c];
        y[c] = v;
    }
    SYNC();
}

// y = M x for the symmetric M kept in shared memory as W's strict lower triangle (W[i, l], i > l,
// leading dimension ld) and its diagonal Mdg. One warp per row.
DEV void symv_lower(const double* W, const double* Mdg, int k, int ld, const double* x, double* y) {
    for (int i = WID; i < k; i += NWARPS) {
        double acc = 0.0;
        for (int l = LANE; l < k; l += WARP) {
            const double w = l < i ? W[i * ld + l] : (l > i ? W[l * ld + i] : Mdg[i]);
            acc += w * x[l];
        }
        acc = warp_sum(acc);
        if (LANE == 0) y[i] = acc;
    }
}

// Tile sizes (compile-time, from the host: dqp.solvers.fused): a thread of the TX×TY grid
// (TX = WARP lanes, TY = NT/WARP warps) owns rows ty + TY·a (a < DQP_RR) and columns tx + TX·c
// (c < DQP_RC) of S, DQP_RR ≥ ⌈k/TY⌉ and DQP_RC ≥ ⌈k/TX⌉; the triangular solves keep entry
// LANE + WARP·c of a vector in lane LANE's register c.
#ifndef DQP_RR
#define DQP_RR 1
#endif
#ifndef DQP_RC
#define DQP_RC 1
#endif
// slack after W for chol_upper's unpredicated tile reads past row k−1
#define DQP_PAD (WARP * DQP_RC + (NT / WARP) * DQP_RR)

#if defined(DQP_CPU) && !defined(DQP_CPU_TILES)
// The C++ build's factorization and solves (one thread per block): the same S = Ũᵀ D⁻¹ Ũ in W's
// upper triangle and 1/Ũ_jj in invd as the CUDA code below, by plain loops over the triangle (the
// register tiles would update all k² entries at every step with one thread). Tests also build the
// tile code on the CPU (-DDQP_CPU_TILES).
DEV int chol_upper(double* W, const double* Mdg, const double* Sd, int k, int ld, double* invd, int* flag,
                   const double* cm) {
    for (int i = 0; i < k; ++i) {
        const double ci = cm ? cm[i] : 1.0;
        W[i * ld + i] = ci * Mdg[i] + Sd[i];
        for (int l = i + 1; l < k; ++l) W[i * ld + l] = cm ? ci * cm[l] * W[l * ld + i] : W[l * ld + i];
    }
    int ok = 1;
    for (int j = 0; j < k; ++j) {
        const double* rj = W + j * ld;
        const double djj = rj[j];
        const int good = djj > 0.0 && DQP_ISFINITE(djj);
        const double inv = good ? 1.0 / djj : 0.0;
        invd[j] = inv;
        if (!good) ok = 0;
        for (int i = j + 1; i < k; ++i) {
            const double f = rj[i] * inv;
            double* ri = W + i * ld;
            for (int l = i; l < k; ++l) ri[l] -= f * rj[l];
        }
    }
    *flag = ok;
    return ok;
}

DEV void chol_solve(const double* U, int k, int ld, const double* invd, double* x) {
    for (int j = 0; j < k; ++j) {
        const double wj = x[j] * invd[j];
        x[j] = wj;
        const double* uj = U + j * ld;
        for (int i = j + 1; i < k; ++i) x[i] -= uj[i] * wj;
    }
    for (int j = k - 1; j >= 0; --j) {
        const double* uj = U + j * ld;
        double acc = 0.0;
        for (int l = j + 1; l < k; ++l) acc += uj[l] * x[l];
        x[j] -= invd[j] * acc;
    }
}
#else
// Cholesky-type factorization S = Ũᵀ D⁻¹ Ũ of S = M + diag(Sd) (M: the strict lower triangle of W
// and Mdg; with a 0/1 mask cm, S = diag(cm) M diag(cm) + diag(Sd): the polish's reduced system), D = diag(Ũ_jj): row j of Ũ is row j of the Schur complement at step j, unscaled (so
// U = D^{-1/2} Ũ is the Cholesky factor; no square roots are taken). The trailing matrix is held in
// registers, each thread its tile. Step j: the owners of row j write it to W's upper triangle, a
// barrier, every thread updates its tile from row j. Tile entries of finished rows (i ≤ j) and
// of the lower triangle are dead (never written back), so the update runs unpredicated over the
// tile rows that may still be live (a ≥ a0, see the phases below). Ũ ends up in W's upper
// triangle, 1/Ũ_jj in invd. Returns 1 when every pivot was positive and finite. invd: shared k
// doubles; flag: shared int. W needs DQP_PAD doubles of slack after its k·ld (the unpredicated
// reads of row k−1 run past it).
// (Measured on an H200, k = 100, 512 threads, per factorization: a predicated version
// 201K cycles, one where warps skipped finished rows by a runtime branch 267K.)
DEV int chol_upper(double* W, const double* Mdg, const double* Sd, int k, int ld, double* invd, int* flag,
                   const double* cm) {
    const int TX = WARP, TY = NT / WARP;
    const int tx = TID % TX, ty = TID / TX;
    double R[DQP_RR][DQP_RC];
#pragma unroll
    for (int a = 0; a < DQP_RR; ++a) {
        const int i = ty + TY * a;
#pragma unroll
        for (int c = 0; c < DQP_RC; ++c) {
            const int l = tx + TX * c;
            double v = 0.0;
            if (i < k && l < k && l >= i) {
                const double ci = cm ? cm[i] : 1.0;
                v = l == i ? ci * Mdg[i] + Sd[i] : (cm ? ci * cm[l] : 1.0) * W[l * ld + i];
            }
            R[a][c] = v;
        }
    }
    if (TID == 0) *flag = 1;
    // Phase a0: the steps j ∈ [TY·a0, TY·(a0+1)), where row j is row a0 of its owner's tile and the
    // tile rows a < a0 (rows i < TY·a0 ≤ j) are finished: the update skips them, by compile-time
    // ranges (about half the work of updating every tile row at every step; the same operations
    // on the live entries). Measured on an H200, k = 100, 384 threads, cycles per factorization:
    // 107K with a loop over all j (owner row j / TY, a runtime tile index resolved by a loop over
    // a), 70K with these phases updating every row, 66K skipping the finished ones.
#pragma unroll
    for (int a0 = 0; a0 < DQP_RR; ++a0) {
        const int jend = TY * (a0 + 1) < k ? TY * (a0 + 1) : k;
        for (int j = TY * a0; j < jend; ++j) {
            if (j - TY * a0 == ty) {     // the owners of row j publish it (entries l ≥ j)
#pragma unroll
                for (int c = 0; c < DQP_RC; ++c) {
                    const int l = tx + TX * c;
                    if (l >= j && l < k) W[j * ld + l] = R[a0][c];
                }
            }
            SYNC();
            const double* rj = W + j * ld;
            const double djj = rj[j];
            const int good = djj > 0.0 && DQP_ISFINITE(djj);
            const double inv = good ? DQP_RCP(djj) : 0.0;
            if (TID == 0) {
                invd[j] = inv;
                if (!good) *flag = 0;
            }
            const double* rt = rj + tx;
            double rl[DQP_RC];
#pragma unroll
            for (int c = 0; c < DQP_RC; ++c) rl[c] = rt[TX * c];
            const double* rs = rj + ty;
#pragma unroll
            for (int a = a0; a < DQP_RR; ++a) {
                const double f = rs[TY * a] * inv;
#pragma unroll
                for (int c = 0; c < DQP_RC; ++c) R[a][c] -= f * rl[c];
            }
        }
    }
    SYNC();
    return *flag;
}

#if defined(DQP_CPU_THREADS)
// (the threaded test build defines DQP_SHFL at the top: a per-warp emulation)
#elif defined(DQP_CPU)
#define DQP_SHFL(v, src) (v)
#else
#define DQP_SHFL(v, src) __shfl_sync(0xffffffffu, (v), (src))
#endif

// x ← S⁻¹ x with S = Ũᵀ D⁻¹ Ũ from chol_upper (Ũ in W's upper triangle, invd = 1/Ũ_jj):
// Ũᵀ ŵ = x (ŵ_j = (x_j − Σ_{i<j} Ũ_ij ŵ_i)/Ũ_jj), then x_j = ŵ_j − (1/Ũ_jj) Σ_{l>j} Ũ_jl x_l.
// Warp 0 works with x in registers (entry LANE + WARP·c in register c), by blocks of WARP rows:
// the block index is a compile-time register index, and each step's value comes from its owner
// lane by a shuffle. The block waits at the final barrier.
DEV void chol_solve(const double* U, int k, int ld, const double* invd, double* x) {
    if (WID == 0) {
        double xr[DQP_RC], gr[DQP_RC];
#pragma unroll
        for (int c = 0; c < DQP_RC; ++c) {
            const int i = LANE + WARP * c;
            xr[c] = i < k ? x[i] : 0.0;
            gr[c] = i < k ? invd[i] : 0.0;
        }
        // Ũᵀ ŵ = x (row j of Ũ is contiguous)
#pragma unroll
        for (int cb = 0; cb < DQP_RC; ++cb) {
            const int jend = k - WARP * cb < WARP ? k - WARP * cb : WARP;
            for (int jj = 0; jj < jend; ++jj) {
                const int j = WARP * cb + jj;
                const double wj = DQP_SHFL(xr[cb], jj) * invd[j];
                const double* uj = U + j * ld;
                const int i0 = LANE + WARP * cb;
                if (i0 == j) xr[cb] = wj;
                else if (i0 > j && i0 < k) xr[cb] -= uj[i0] * wj;
#pragma unroll
                for (int c = cb + 1; c < DQP_RC; ++c) {
                    const int i = LANE + WARP * c;
                    if (i < k) xr[c] -= uj[i] * wj;
                }
            }
        }
        // x_j = ŵ_j − invd_j Σ_{l>j} Ũ_jl x_l, column-oriented (column j of Ũ, strided)
#pragma unroll
        for (int cb = DQP_RC - 1; cb >= 0; --cb) {
            const int jend = k - WARP * cb < WARP ? k - WARP * cb : WARP;
            for (int jj = jend - 1; jj >= 0; --jj) {
                const int j = WARP * cb + jj;
                const double xj = DQP_SHFL(xr[cb], jj);
                const int i0 = LANE + WARP * cb;
                if (i0 < j) xr[cb] -= gr[cb] * (U[i0 * ld + j] * xj);
#pragma unroll
                for (int c = 0; c < cb; ++c) xr[c] -= gr[c] * (U[(LANE + WARP * c) * ld + j] * xj);
            }
        }
#pragma unroll
        for (int c = 0; c < DQP_RC; ++c) {
            const int i = LANE + WARP * c;
            if (i < k) x[i] = xr[c];
        }
    }
    SYNC();
}

#endif  // DQP_CPU && !DQP_CPU_TILES

// Largest α ≥ 0 with v + α dv ≥ 0, capped (as solvers/ipm.py's _max_step): 1/max(max(−dv/v), 1/cap).
// The caller reduces `part` (this thread's max of −dv/v) over the block.
DEV double step_part(const double* v, const double* dv, int m) {
    double acc = -DQP_BIG;
    for (int i = TID; i < m; i += NT) acc = dmax(acc, -dv[i] / v[i]);
    return acc;
}

// out[i, j] (row-major k×k) = the lower Cholesky factor of diag(sc) S diag(sc), S = Ũᵀ D⁻¹ Ũ from
// chol_upper: sc_i Ũ_ji (1/Ũ_jj)^{1/2} for i ≥ j, 0 above (the polish's reduced system in the
// caller's scaling, the factor dqp.linsolve.torch_batched.BatchedKKT keeps as LS).
DEV void store_factor(const double* W, const double* invd, const double* scv, int k, int ld,
                      double* __restrict__ out) {
    for (long long t = TID; t < (long long)k * k; t += NT) {
        const int i = (int)(t / k), j = (int)(t % k);
        out[t] = j <= i ? scv[i] * W[j * ld + i] * DQP_SQRT(invd[j]) : 0.0;
    }
}

KERNEL dqp_ipm_dual(
    // data (row-scaled constraints), matrices with a batch stride (0: shared)
    const double* __restrict__ P, int sP,
    const double* __restrict__ q, int sq,
    const double* __restrict__ C, int sC,
    const double* __restrict__ d, int sd,
    const double* __restrict__ A, int sA,
    const double* __restrict__ b, int sb,
    const double* __restrict__ M, int sM,          // (k, k): [A; C] P⁻¹ [A; C]ᵀ
    const double* __restrict__ PiAbt, int sPi,     // (n, k): P⁻¹ [A; C]ᵀ
    const double* __restrict__ Piq,                // (B, n): P⁻¹ q
    const double* __restrict__ g,                  // (B, k): [A; C] P⁻¹ q
    const double* __restrict__ norms,              // (B, 5): pscale, qnorm, bnorm, dnorm, max|diag M|
    // starting point (in) and result (out)
    const double* __restrict__ z0, const double* __restrict__ s0, const double* __restrict__ mu0,
    const double* __restrict__ lam0, const double* __restrict__ delta0,
    double* __restrict__ z_out, double* __restrict__ s_out, double* __restrict__ mu_out,
    double* __restrict__ lam_out, long long* __restrict__ status_out, long long* __restrict__ iters_out,
    // the polish (polish_rounds > 0): row norms of [A; C] (B, k) in; active rows (B, m), flags (B,)
    // (1 polished, 2 the caller must polish, 4 the first round's factorization passed) and the
    // reduced system's factor (B, k, k) out
    const double* __restrict__ sc, unsigned char* __restrict__ act_out, long long* __restrict__ pflag_out,
    double* __restrict__ LS_out,
    int n, int m, int p, int max_iter, int stall_iters, int separate_steps, int polish_rounds,
    double eps, double eps_inf, double step_fraction, double reg_d, double wlo, double eps2, double eps_mid, int start,
    long long* prof)
{
    const int k = m + p;
    const long long e = BID;
    P += e * sP; q += e * sq; C += e * sC; d += e * sd; A += e * sA; b += e * sb;
    M += e * sM; PiAbt += e * sPi;
    // ---- shared memory layout
    double* sm = dqp_smem;
    const int ld = k | 1;          // odd leading dimension: column access without bank conflicts
    double* S = sm; sm += (long long)k * ld + DQP_PAD;   // lower: M (constant), upper: S and its factor
    double* Mdg = sm; sm += k;     double* invd = sm; sm += k;
    double* tsc = sm; sm += (long long)NWARPS * n;
    double* z = sm; sm += n;       double* Pz = sm; sm += n;     double* ATl = sm; sm += n;
    double* CTm = sm; sm += n;     double* rd = sm; sm += n;     double* dz = sm; sm += n;
    double* pz = sm; sm += n;      double* pPz = sm; sm += n;    double* pAy = sm; sm += n;
    double* qv = sm; sm += n;      double* piq = sm; sm += n;
    double* y = sm; sm += k;       double* Abz = sm; sm += k;    double* At = sm; sm += k;
    double* dy = sm; sm += k;      double* My = sm; sm += k;     double* Sd = sm; sm += k;
    double* py = sm; sm += k;      double* pAbz = sm; sm += k;   double* gv = sm; sm += k;
    double* bd = sm; sm += k;      double* yt = sm; sm += k;
    double* s = sm; sm += m + 1;   double* dsa = sm; sm += m + 1; double* ds = sm; sm += m + 1;
    double* red = sm; sm += (NWARPS + 1) * MAXRED;
    int* flag = (int*)sm;
    double* lam = y;               // y = [λ; μ]
    double* mu = y + p;

    for (int i = TID; i < n; i += NT) {
        z[i] = z0[e * n + i]; qv[i] = q[i]; piq[i] = Piq[e * n + i];
        pz[i] = 0.0; pPz[i] = 0.0; pAy[i] = 0.0;
    }
    for (int j = TID; j < k; j += NT) {
        y[j] = j < p ? lam0[e * p + j] : mu0[e * m + j - p];
        gv[j] = g[e * k + j];
        bd[j] = j < p ? b[j] : d[j - p];
        py[j] = 0.0; pAbz[j] = 0.0;
    }
    for (int i = TID; i < m; i += NT) s[i] = s0[e * m + i];
    for (long long t = TID; t < (long long)k * k; t += NT) {
        const int i = (int)(t / k), l = (int)(t % k);
        if (i > l) S[i * ld + l] = M[t];
        else if (i == l) Mdg[i] = M[t];
    }
    const double pscale = norms[e * 5 + 0], qnorm = norms[e * 5 + 1];
    const double bnorm = norms[e * 5 + 2], dnorm = norms[e * 5 + 3], Md = norms[e * 5 + 4];
    const double Ascale = p ? 1.0 : 0.0, Cscale = m ? 1.0 : 0.0;
    double delta = delta0[e];
    int nfail = 0, iters = 0, pinf_cnt = 0, dinf_cnt = 0, have_prev = 0, last_impr = 0;
    long long status = ST_MAX_ITER;
    double best = DQP_BIG;
    SYNC();

    if (start) {
        // the starting point of solvers/ipm.py's _init, here instead of z0, s0, μ0, λ0: the KKT
        // system with W = I, y = −(M + δ reg Md I + diag(0, I))⁻¹ (ĀP⁻¹q + [b; d]), z = −P⁻¹q − P⁻¹Āᵀy,
        // λ = y_A; ŝ = d − Cz, then s = ŝ and μ = −ŝ shifted to ≥ 1 where not positive; all defaults
        // (z = 0, s = μ = 1, λ = 0) where the factorization fails or a value is not finite
        for (int j = TID; j < k; j += NT) {
            Sd[j] = delta * reg_d * Md + (j >= p ? 1.0 : 0.0);
            dy[j] = -(gv[j] + bd[j]);
        }
        SYNC();
        const int ok0 = chol_upper(S, Mdg, Sd, k, ld, invd, flag, nullptr);
        chol_solve(S, k, ld, invd, dy);
        matvec(PiAbt, n, k, k, dy, dz);
        SYNC();
        for (int i = TID; i < n; i += NT) z[i] = -piq[i] - dz[i];
        SYNC();
        if (m) matvec(C, m, n, n, z, Abz + p);
        SYNC();
        double mx0[3] = {-DQP_BIG, -DQP_BIG, 0.0};    // max(−ŝ), max(ŝ), count of non-finite values
        for (int i = TID; i < m; i += NT) {
            const double sh = bd[p + i] - Abz[p + i];
            ds[i] = sh;
            mx0[0] = dmax(mx0[0], -sh);
            mx0[1] = dmax(mx0[1], sh);
        }
        for (int i = TID; i < n; i += NT) mx0[2] += DQP_ISFINITE(z[i]) ? 0.0 : 1.0;
        for (int j = TID; j < p; j += NT) mx0[2] += DQP_ISFINITE(dy[j]) ? 0.0 : 1.0;
        for (int i = TID; i < m; i += NT) mx0[2] += DQP_ISFINITE(ds[i]) ? 0.0 : 1.0;
        double cnt[1] = {mx0[2]};
        block_reduce(cnt, 1, mx0, 2, red);
        const double lo_s = -mx0[0], lo_mu = -mx0[1];     // min ŝ, min(−ŝ)
        const int bad0 = !ok0 || cnt[0] != 0.0 || !DQP_ISFINITE(lo_s) || !DQP_ISFINITE(lo_mu);
        for (int i = TID; i < n; i += NT) z[i] = bad0 ? 0.0 : z[i];
        for (int j = TID; j < p; j += NT) y[j] = bad0 ? 0.0 : dy[j];
        for (int i = TID; i < m; i += NT) {
            const double sh = ds[i];
            s[i] = bad0 ? 1.0 : (lo_s > 0.0 ? sh : sh + (1.0 - lo_s));
            mu[i] = bad0 ? 1.0 : (lo_mu > 0.0 ? -sh : -sh + (1.0 - lo_mu));
        }
        SYNC();
    }

    PROF_INIT
    // Two stages where eps2 < eps (and the polish runs): the IPM stops at the looser eps and
    // polishes; an element whose polished point is rejected goes on from its IPM point to eps2 and
    // polishes again (see the end of the stage loop). Three where also eps2 < eps_mid < eps: the
    // second stop and polish at eps_mid, the third at eps2.
    int it = 0;
    double eps_cur = eps;
    long long pflag_last = 0;
    for (int stage = 0;; ++stage) {
    for (;; ++it) {
        // ---------------- products at the iterate: P z, [A; C] z, Aᵀλ, Cᵀμ
        matvec(P, n, n, n, z, Pz);
        if (p) matvec(A, p, n, n, z, Abz);
        if (m) matvec(C, m, n, n, z, Abz + p);
        if (p) matvec_t(A, p, n, n, lam, ATl, tsc);
        if (m) matvec_t(C, m, n, n, mu, CTm, tsc);
        SYNC();
        for (int i = TID; i < n; i += NT)
            rd[i] = Pz[i] + qv[i] + (p ? ATl[i] : 0.0) + (m ? CTm[i] : 0.0);
        SYNC();

        PROF(0)
        // ---------------- the check (solvers/ipm.py `_check`), every iteration
        // sums: gap, zᵀPz, qᵀz, ‖Ay‖₁, ‖ΔAy‖₁, bᵀλ+dᵀμ, bᵀΔλ+dᵀΔμ, qᵀΔz
        // maxs: |req|, |rin|, |Az|, |Cz|, |s|, |rd|, |Pz|, |ATl|, |CTm|, |z|, |λ|, |μ|, |Ay|,
        //       |Δλ|, |Δμ|, |ΔAy|, |Δz|, |ΔPz|, |ΔAz|, max Cz, max ΔCz, −min Δμ
        double su[8] = {0, 0, 0, 0, 0, 0, 0, 0};
        double mx[22];
        for (int j = 0; j < 22; ++j) mx[j] = 0.0;
        mx[19] = -DQP_BIG; mx[20] = -DQP_BIG; mx[21] = -DQP_BIG;
        for (int i = TID; i < n; i += NT) {
            const double ay = (p ? ATl[i] : 0.0) + (m ? CTm[i] : 0.0);
            const double day = ay - pAy[i];
            su[1] += z[i] * Pz[i]; su[2] += qv[i] * z[i];
            su[3] += dabs(ay); su[4] += dabs(day); su[7] += qv[i] * (z[i] - pz[i]);
            mx[5] = dmax(mx[5], dabs(rd[i])); mx[6] = dmax(mx[6], dabs(Pz[i]));
            if (p) mx[7] = dmax(mx[7], dabs(ATl[i]));
            if (m) mx[8] = dmax(mx[8], dabs(CTm[i]));
            mx[9] = dmax(mx[9], dabs(z[i])); mx[12] = dmax(mx[12], dabs(ay));
            mx[15] = dmax(mx[15], dabs(day)); mx[16] = dmax(mx[16], dabs(z[i] - pz[i]));
            mx[17] = dmax(mx[17], dabs(Pz[i] - pPz[i]));
        }
        for (int j = TID; j < k; j += NT) {
            const double dyj = y[j] - py[j];
            su[5] += bd[j] * y[j]; su[6] += bd[j] * dyj;
            if (j < p) {
                mx[0] = dmax(mx[0], dabs(Abz[j] - bd[j])); mx[2] = dmax(mx[2], dabs(Abz[j]));
                mx[10] = dmax(mx[10], dabs(y[j])); mx[13] = dmax(mx[13], dabs(dyj));
                mx[18] = dmax(mx[18], dabs(Abz[j] - pAbz[j]));
            } else {
                const double sj = s[j - p];
                su[0] += sj * y[j];
                mx[1] = dmax(mx[1], dabs(Abz[j] + sj - bd[j])); mx[3] = dmax(mx[3], dabs(Abz[j]));
                mx[4] = dmax(mx[4], dabs(sj)); mx[11] = dmax(mx[11], dabs(y[j]));
                mx[14] = dmax(mx[14], dabs(dyj)); mx[19] = dmax(mx[19], Abz[j]);
                mx[20] = dmax(mx[20], Abz[j] - pAbz[j]); mx[21] = dmax(mx[21], -dyj);
            }
        }
        block_reduce(su, 8, mx, 22, red);
        const double gap = su[0];
        const double gscl = 1.0 + dabs(su[1]) + dabs(su[2]);
        double pres = 0.0, pscl = 0.0;
        if (p) { pres = mx[0]; pscl = dmax(mx[2], bnorm); }
        if (m) { pres = dmax(pres, mx[1]); pscl = dmax(pscl, dmax(dmax(mx[3], dnorm), mx[4])); }
        pscl = dmax(pscl, 1.0);
        const double dres = mx[5];
        double dscl = dmax(mx[6], qnorm);
        if (p) dscl = dmax(dscl, mx[7]);
        if (m) dscl = dmax(dscl, mx[8]);
        dscl += 1.0;
        const int p_ok = pres <= eps_cur * pscl, d_ok = dres <= eps_cur * dscl;
        const int conv = p_ok && d_ok && gap <= eps_cur * gscl;
        // infeasibility certificates (ipm.py _pcert/_dcert)
        const double radius = 1e3 * (1.0 + mx[9]);
        const double ynorm = dmax(dmax(mx[10], mx[11]), DQP_TINY);
        const double val1 = su[5] / ynorm;
        const int small1 = (mx[12] / ynorm <= eps_inf * (Ascale + Cscale)) || (su[3] / ynorm * radius <= -val1);
        const int c1 = small1 && val1 < -eps_inf;
        const double dyn = dmax(dmax(mx[13], mx[14]), DQP_TINY);
        const double val2 = su[6] / dyn;
        const int small2 = (mx[15] / dyn <= eps_inf * (Ascale + Cscale)) || (su[4] / dyn * radius <= -val2);
        int c2 = small2 && val2 < -eps_inf;
        if (m) c2 = c2 && (-mx[21] >= -eps_inf * dyn);
        const int pinf = ((c1 && ynorm > 1.0 / DQP_SQRT(eps_inf)) || (c2 && have_prev)) && !p_ok;
        const double qn = dmax(qnorm, DQP_TINY);
        const double zn = dmax(mx[9], DQP_TINY);
        int e1 = mx[6] <= eps_inf * pscale * zn;
        if (p) e1 = e1 && mx[2] <= eps_inf * Ascale * zn;
        if (m) e1 = e1 && mx[19] <= eps_inf * Cscale * zn;
        e1 = e1 && su[2] < -eps_inf * qn * zn;
        const double dzn = dmax(mx[16], DQP_TINY);
        int e2 = mx[17] <= eps_inf * pscale * dzn;
        if (p) e2 = e2 && mx[18] <= eps_inf * Ascale * dzn;
        if (m) e2 = e2 && mx[20] <= eps_inf * Cscale * dzn;
        e2 = e2 && su[7] < -eps_inf * qn * dzn;
        const int dinf = ((e1 && zn > 1.0 / DQP_SQRT(eps_inf)) || (e2 && have_prev)) && !d_ok;

        // (no check at the starting point, as the torch loop: the first check follows the first step)
        if (it > 0) {
            int done = 0;
            if (conv) { status = ST_SOLVED; done = 1; }
            if (!done) { pinf_cnt += pinf; dinf_cnt += dinf; }
            if (!done && pinf_cnt >= 2) { status = ST_PRIMAL_INFEASIBLE; done = 1; }
            if (!done && dinf_cnt >= 2) { status = ST_DUAL_INFEASIBLE; done = 1; }
            if (!done && nfail >= 8) {
                status = pinf_cnt > 0 ? ST_PRIMAL_INFEASIBLE : (dinf_cnt > 0 ? ST_DUAL_INFEASIBLE : ST_NUMERICAL);
                done = 1;
            }
            const double merit = dmax(dmax(pres / pscl, dres / dscl), gap / gscl);
            if (merit < 0.5 * best) { best = merit; last_impr = it; }
            if (!done && it - last_impr >= stall_iters) { status = ST_NUMERICAL; done = 1; }
            have_prev = 1;
            if (done || it == max_iter) break;
            // (the previous iterate, for the certificates along the step)
            for (int i = TID; i < n; i += NT) {
                pz[i] = z[i]; pPz[i] = Pz[i]; pAy[i] = (p ? ATl[i] : 0.0) + (m ? CTm[i] : 0.0);
            }
            for (int j = TID; j < k; j += NT) { py[j] = y[j]; pAbz[j] = Abz[j]; }
        }

        PROF(1)
        // ---------------- one predictor-corrector step (ipm.py `_step`, dual form, float64)
        ++iters;
        const double reg = delta * reg_d * Md;
        for (int j = TID; j < k; j += NT) {
            double add = reg;
            if (j >= p) {
                const double w = s[j - p] / y[j];
                add += w < wlo ? wlo : (w > 1.0 / wlo ? 1.0 / wlo : w);
            }
            Sd[j] = add;
        }
        SYNC();
        // M y, for ĀP⁻¹a = −Āz − ĀP⁻¹q − M y (a = −r_d: no solve with P per iteration)
        symv_lower(S, Mdg, k, ld, y, My);
        SYNC();
        PROF(2)
        const int fact_ok = chol_upper(S, Mdg, Sd, k, ld, invd, flag, nullptr);   // S = M + diag(Sd)
        PROF(3)
        for (int j = TID; j < k; j += NT) {
            At[j] = -Abz[j] - gv[j] - My[j];
            // predictor right-hand side: At − [−r_eq; −r_in + s]
            dy[j] = j < p ? At[j] + (Abz[j] - bd[j]) : At[j] + (Abz[j] + s[j - p] - bd[j]) - s[j - p];
        }
        SYNC();
        chol_solve(S, k, ld, invd, dy);
        PROF(4)
        double ap = 1.0, ad = 1.0;
        if (m) {
            // affine step: CΔz = c + diag(S − M)_C Δμ, Δs = −r_in − CΔz
            for (int i = TID; i < m; i += NT) {
                const double rin = Abz[p + i] + s[i] - bd[p + i];
                const double caff = -rin + s[i];
                dsa[i] = -rin - (caff + Sd[p + i] * dy[p + i]);
            }
            SYNC();
            double su1[1] = {0.0};
            double mx2[2] = {step_part(s, dsa, m), step_part(mu, dy + p, m)};
            block_reduce(su1, 0, mx2, 2, red);
            double apa = 1.0 / dmax(mx2[0], 1.0), ada = 1.0 / dmax(mx2[1], 1.0);
            if (!separate_steps) { apa = dmin(apa, ada); ada = apa; }
            const double tau = gap / m;
            double sa[1] = {0.0};
            for (int i = TID; i < m; i += NT) sa[0] += (s[i] + apa * dsa[i]) * (mu[i] + ada * dy[p + i]);
            block_reduce(sa, 1, mx2, 0, red);
            const double mu_aff = sa[0] / m;
            double sig = mu_aff / dmax(tau, DQP_TINY);
            sig = sig < 0.0 ? 0.0 : (sig > 1.0 ? 1.0 : sig);
            sig = sig * sig * sig;
            // corrector right-hand side: At − [−r_eq; −r_in + r_c/μ], r_c = sμ + Δs_aΔμ_a − στ
            // (dsa keeps Δs_a; dy's μ part, Δμ_a, is read before it is overwritten)
            for (int j = TID; j < k; j += NT) {
                if (j < p) {
                    yt[j] = At[j] + (Abz[j] - bd[j]);
                } else {
                    const int i = j - p;
                    const double rin = Abz[j] + s[i] - bd[j];
                    const double rc = s[i] * mu[i] + dsa[i] * dy[j] - sig * tau;
                    yt[j] = At[j] - (-rin + rc / mu[i]);
                }
            }
        } else {
            for (int j = TID; j < k; j += NT) yt[j] = At[j] + (Abz[j] - bd[j]);
        }
        SYNC();
        for (int j = TID; j < k; j += NT) dy[j] = yt[j];
        SYNC();
        chol_solve(S, k, ld, invd, dy);
        symv_lower(S, Mdg, k, ld, dy, My);
        for (int j = TID; j < k; j += NT) yt[j] = y[j] + dy[j];
        SYNC();
        PROF(5)
        // Δz = −z − P⁻¹q − P⁻¹Āᵀ(y + Δy)
        matvec(PiAbt, n, k, k, yt, dz);
        SYNC();
        for (int i = TID; i < n; i += NT) dz[i] = -z[i] - piq[i] - dz[i];
        for (int i = TID; i < m; i += NT) {
            const double rin = Abz[p + i] + s[i] - bd[p + i];
            ds[i] = -rin - (At[p + i] - My[p + i]);
        }
        SYNC();
        double tot[1] = {0.0};
        for (int i = TID; i < n; i += NT) tot[0] += dz[i];
        for (int j = TID; j < k; j += NT) tot[0] += dy[j];
        for (int i = TID; i < m; i += NT) tot[0] += ds[i];
        if (m) {
            double mx2[2] = {step_part(s, ds, m), step_part(mu, dy + p, m)};
            block_reduce(tot, 1, mx2, 2, red);
            const double eta = dmax(1.0 - DQP_SQRT(gap / gscl), step_fraction);
            ap = dmin(eta * (1.0 / dmax(mx2[0], 1e-30)), 1.0);
            ad = dmin(eta * (1.0 / dmax(mx2[1], 1e-30)), 1.0);
            if (!separate_steps) { ap = dmin(ap, ad); ad = ap; }
        } else {
            double none[1];
            block_reduce(tot, 1, none, 0, red);
        }
        const int ok = fact_ok && DQP_ISFINITE(tot[0]);
        delta = delta * (ok ? 0.5 : 100.0);
        delta = delta < 1.0 ? 1.0 : (delta > 1e12 ? 1e12 : delta);
        nfail = ok ? 0 : nfail + 1;
        if (ok) {
            for (int i = TID; i < n; i += NT) z[i] += ap * dz[i];
            for (int j = TID; j < p; j += NT) lam[j] += ad * dy[j];
            for (int i = TID; i < m; i += NT) {
                s[i] = dmax(s[i] + ap * ds[i], DQP_TINY);
                mu[i] = dmax(mu[i] + ad * dy[p + i], DQP_TINY);
            }
        }
        SYNC();
        PROF(6)
    }

    // ---------------- the polish (dqp.ipm_layer.polish, its Cholesky path, in the row scaling)
    // Rows J: the equalities and the active inequalities (s < μ). The reduced KKT system
    // [P Ā_Jᵀ; Ā_J 0] is solved through its Schur complement M_JJ, a masked copy of the M kept in
    // S's lower triangle: M_JJ y = −(ĀP⁻¹q + [b; d])_J, one step of iterative refinement, z =
    // −P⁻¹q − P⁻¹Ā_Jᵀ y. Rows outside J get the diagonal 1/sc² (1 in the caller's scaling, as
    // BatchedKKT's D) and y = 0. Accepted where finite with multipliers ≥ −τ(1 + max|μ|) and the
    // other rows satisfied to τ(1 + |d|) (τ = √eps, in the caller's scaling); else the offending
    // rows move and the next round tries again. The factor of the accepted round (else of the
    // first) goes to LS_out for the backward.
    if (polish_rounds > 0) {
        const int solved = status == ST_SOLVED;
        const double* scv = sc + e * k;
        double* cm = py;           // the mask of J (1.0 / 0.0)
        double* badv = At;         // rows that fail the acceptance test
        for (int j = TID; j < k; j += NT)
            cm[j] = j < p ? 1.0 : ((solved && s[j - p] < mu[j - p]) ? 1.0 : 0.0);
        // (from s and μ, not from cm: thread t wrote cm[t, t+NT, ...], and cm[p+i] is another
        // thread's until the barrier — the threaded CPU build caught that race)
        for (int i = TID; i < m; i += NT) act_out[e * m + i] = (unsigned char)(solved && s[i] < mu[i]);
        SYNC();
        long long pflag = 0;
        const double tol = 1.4901161193847656e-08;        // √eps of float64
        for (int r = 0; r < polish_rounds; ++r) {
            for (int j = TID; j < k; j += NT) {
                Sd[j] = cm[j] != 0.0 ? 0.0 : 1.0 / (scv[j] * scv[j]);
                dy[j] = cm[j] != 0.0 ? -(gv[j] + bd[j]) : 0.0;
                yt[j] = dy[j];
            }
            SYNC();
            const int fok = chol_upper(S, Mdg, Sd, k, ld, invd, flag, cm);
            // BatchedKKT._pivots_ok in the caller's scaling: min pivot² > 100 eps k max|diag|
            double pm[2] = {0.0, -DQP_BIG};
            for (int j = TID; j < k; j += NT) {
                const double s2 = scv[j] * scv[j];
                pm[0] = dmax(pm[0], cm[j] != 0.0 ? dabs(s2 * Mdg[j]) : 1.0);
                pm[1] = dmax(pm[1], -s2 * S[j * ld + j]);
            }
            double none[1];
            block_reduce(none, 0, pm, 2, red);
            const int kok = fok && -pm[1] > 100.0 * 2.220446049250313e-16 * k * pm[0];
            if (r == 0) {
                if (kok) pflag |= 4;
                store_factor(S, invd, scv, k, ld, LS_out + e * (long long)k * k);
            }
            if (!solved || !kok) {
                if (solved) pflag |= 2;
                break;
            }
            chol_solve(S, k, ld, invd, dy);
            symv_lower(S, Mdg, k, ld, dy, My);        // (y is 0 outside J)
            SYNC();
            for (int j = TID; j < k; j += NT) yt[j] -= cm[j] * My[j] + Sd[j] * dy[j];
            SYNC();
            chol_solve(S, k, ld, invd, yt);
            for (int j = TID; j < k; j += NT) dy[j] += yt[j];
            SYNC();
            matvec(PiAbt, n, k, k, dy, dz);
            SYNC();
            for (int i = TID; i < n; i += NT) dz[i] = -piq[i] - dz[i];
            SYNC();
            if (m) matvec(C, m, n, n, dz, pAbz);
            SYNC();
            double fin[2] = {0.0, 0.0};
            double amax[1] = {0.0};
            for (int i = TID; i < n; i += NT) fin[0] += dz[i];
            for (int j = TID; j < k; j += NT) {
                fin[0] += dy[j];
                if (j >= p) amax[0] = dmax(amax[0], dabs(dy[j] / scv[j]));
            }
            block_reduce(fin, 1, amax, 1, red);
            const double scale = 1.0 + amax[0];
            for (int i = TID; i < m; i += NT) {
                const int j = p + i;
                const int bad = cm[j] != 0.0 ? (dy[j] / scv[j] < -tol * scale)
                                             : (scv[j] * (pAbz[i] - bd[j]) > tol * (1.0 + dabs(scv[j] * bd[j])));
                badv[j] = bad;
                fin[1] += bad;
            }
            block_reduce(fin + 1, 1, none, 0, red);
            if (DQP_ISFINITE(fin[0]) && fin[1] == 0.0) {
                for (int i = TID; i < n; i += NT) z[i] = dz[i];
                for (int j = TID; j < p; j += NT) lam[j] = dy[j];
                for (int i = TID; i < m; i += NT) {
                    mu[i] = dmax(dy[p + i], 0.0);
                    act_out[e * m + i] = (unsigned char)(cm[p + i] != 0.0);
                }
                if (r > 0) store_factor(S, invd, scv, k, ld, LS_out + e * (long long)k * k);
                pflag |= 1;
                break;
            }
            if (!DQP_ISFINITE(fin[0]) || m == 0) break;
            for (int i = TID; i < m; i += NT)
                if (badv[p + i] != 0.0) cm[p + i] = 1.0 - cm[p + i];
            SYNC();
        }
        if (TID == 0) pflag_out[e] = pflag;
        pflag_last = pflag;
        SYNC();
    }
    // the next stage: the IPM point of a solved element whose polish was rejected is intact (the
    // polish writes z, μ, λ only when it accepts), so the IPM goes on from it to eps_mid or eps2 — the
    // iterates a single stage at eps2 would take, its counters untouched, except that the
    // certificates along the step wait one check (the polish's scratch holds their previous
    // iterate: have_prev = 0) — and polishes again
    const double eps_next = (stage == 0 && eps_mid > eps2 && eps_mid < eps_cur) ? eps_mid : eps2;
    if (stage > 1 || !(eps_next > 0.0 && eps_next < eps_cur) || polish_rounds == 0 || status != ST_SOLVED
        || (pflag_last & 1))
        break;
    eps_cur = eps_next;
    status = ST_MAX_ITER;
    have_prev = 0;
    SYNC();
    }
    for (int i = TID; i < n; i += NT) z_out[e * n + i] = z[i];
    for (int i = TID; i < m; i += NT) { s_out[e * m + i] = s[i]; mu_out[e * m + i] = mu[i]; }
    for (int j = TID; j < p; j += NT) lam_out[e * p + j] = lam[j];
    if (TID == 0) { status_out[e] = status; iters_out[e] = iters; }
}

// ---- One diagonal block of the blocked batched Cholesky factorization (dqp.linsolve.blocked).
// Block e factorizes the nb × nb block at A + e·sA (row stride lda; its lower triangle is read)
// with chol_upper, the register-tile factorization above (nb ≤ the tile's capacity), and writes
// L, the lower Cholesky factor with zeros above the diagonal, over the block, and L⁻¹ (lower,
// zeros above) to Dinv + e·nb² (contiguous). Where a pivot is not positive and finite, and info[e]
// is 0, info[e] = j0 + the 1-based index of the first such pivot (torch.linalg.cholesky_ex's
// convention, offset to the whole matrix); that element's L and L⁻¹ are then finite garbage.
// It replaces the library's batched Cholesky of the block and the triangular inverse, the two
// latency-bound steps of the blocked factorization (a thread block per matrix, all in shared
// memory: one launch instead of ~10).
// Shared memory, in doubles: the block (nb × (nb|1), slack DQP_PAD), 4 nb-vectors and the flag.
#define DQP_CHOL_BLOCK_WORDS(nb) ((long long)(nb) * ((nb) | 1) + DQP_PAD + 4LL * (nb) + 1)

// X = L⁻¹ for L in W's strict lower triangle (leading dimension ld) with 1/L_jj in rl: X[i, c]
// (c ≤ i) goes to W[c·ld + i], the upper triangle and the diagonal (L stays). Ends with a barrier.
#if defined(DQP_CPU) && !defined(DQP_CPU_TILES)
// (the C++ build: forward substitution, column by column)
DEV void tri_inverse_lower(double* W, int k, int ld, const double* rl) {
    for (int c = 0; c < k; ++c) {
        double* x = W + (long long)c * ld;
        x[c] = rl[c];
        for (int i = c + 1; i < k; ++i) {
            const double* Li = W + (long long)i * ld;
            double acc = 0.0;
            for (int l = c; l < i; ++l) acc += Li[l] * x[l];
            x[i] = -acc * rl[i];
        }
    }
}
#else
// Right-looking, as chol_upper: the rows of X are X[j, :] = (e_j − Σ_{l<j} L[j, l] X[l, :]) / L_jj.
// The right-hand sides R (starting as I) are held in register tiles, the layout of chol_upper's;
// step j: the owners of row j publish X[j, :] = R[j, :] / L_jj (entries l ≤ j, to W[l·ld + j]), a
// barrier, every thread updates its tile rows i from L[i, j] and X[j, :]. Phases of one tile row
// as in chol_upper (tile rows a < a0 are finished). Rows i ≤ j are dead: their updates read
// garbage and are never published.
DEV void tri_inverse_lower(double* W, int k, int ld, const double* rl) {
    const int TX = WARP, TY = NT / WARP;
    const int tx = TID % TX, ty = TID / TX;
    double R[DQP_RR][DQP_RC];
#pragma unroll
    for (int a = 0; a < DQP_RR; ++a)
#pragma unroll
        for (int c = 0; c < DQP_RC; ++c) R[a][c] = (ty + TY * a == tx + TX * c) ? 1.0 : 0.0;
#pragma unroll
    for (int a0 = 0; a0 < DQP_RR; ++a0) {
        const int jend = TY * (a0 + 1) < k ? TY * (a0 + 1) : k;
        for (int j = TY * a0; j < jend; ++j) {
            if (j - TY * a0 == ty) {
                const double sj = rl[j];
#pragma unroll
                for (int c = 0; c < DQP_RC; ++c) {
                    const int l = tx + TX * c;
                    if (l <= j) W[(long long)l * ld + j] = R[a0][c] * sj;
                }
            }
            SYNC();
            double xl[DQP_RC];
#pragma unroll
            for (int c = 0; c < DQP_RC; ++c) {
                const int l = tx + TX * c;
                xl[c] = l <= j ? W[(long long)l * ld + j] : 0.0;
            }
#pragma unroll
            for (int a = a0; a < DQP_RR; ++a) {
                const int i = ty + TY * a;
                const double f = i < k ? W[(long long)i * ld + j] : 0.0;
#pragma unroll
                for (int c = 0; c < DQP_RC; ++c) R[a][c] -= f * xl[c];
            }
        }
    }
    SYNC();
}
#endif

KERNEL dqp_chol_block(double* __restrict__ A, int sA, int lda, int nb, double* __restrict__ Dinv,
                      int* __restrict__ info, int j0)
{
    const long long e = BID;
    A += e * sA;
    Dinv += e * (long long)nb * nb;
    double* sm = dqp_smem;
    const int ld = nb | 1;
    double* W = sm; sm += (long long)nb * ld + DQP_PAD;   // lower: the block, then L; upper: Ũ, then L⁻¹ᵀ
    double* dg = sm; sm += nb;      // the block's diagonal, then L's
    double* zr = sm; sm += nb;      // zeros (chol_upper's diagonal shift)
    double* invd = sm; sm += nb;    // 1/Ũ_jj
    double* rl = sm; sm += nb;      // 1/L_jj = √(1/Ũ_jj)
    int* flag = (int*)sm;
    for (int t = TID; t < nb * nb; t += NT) {
        const int i = t / nb, l = t % nb;
        if (l < i) W[i * ld + l] = A[(long long)i * lda + l];
        else if (l == i) { dg[i] = A[(long long)i * lda + i]; zr[i] = 0.0; }
    }
    SYNC();
    chol_upper(W, dg, zr, nb, ld, invd, flag, nullptr);    // S = Ũᵀ D⁻¹ Ũ (ends with a barrier)
    // L = Ũᵀ D^(-1/2): L[i, j] = Ũ[j, i] √invd_j into the lower triangle, L_jj = √Ũ_jj
    for (int t = TID; t < nb * nb; t += NT) {
        const int i = t / nb, j = t % nb;
        if (j < i) W[i * ld + j] = W[j * ld + i] * DQP_SQRT(invd[j]);
    }
    for (int j = TID; j < nb; j += NT) {
        const double v = invd[j];
        const int good = v > 0.0 && DQP_ISFINITE(v);
        rl[j] = good ? DQP_SQRT(v) : 0.0;
        dg[j] = good ? DQP_SQRT(W[j * ld + j]) : 0.0;
    }
    SYNC();
    tri_inverse_lower(W, nb, ld, rl);     // (ends with a barrier)
    for (int t = TID; t < nb * nb; t += NT) {
        const int i = t / nb, l = t % nb;
        A[(long long)i * lda + l] = l < i ? W[i * ld + l] : (l == i ? dg[i] : 0.0);
        Dinv[t] = l <= i ? W[(long long)l * ld + i] : 0.0;
    }
    if (TID == 0) {
        int f = 0;
        for (int j = 0; j < nb && !f; ++j)
            if (rl[j] == 0.0) f = j + 1;
        if (f && info[e] == 0) info[e] = j0 + f;
    }
}

// x ← (L Lᵀ)⁻¹ x for a batch of lower Cholesky factors L (k × k, batch stride sL, only the lower
// triangle read; row-major, or column-major where cm = 1) and vectors x (batch stride sx), one
// thread block per matrix: L goes to shared memory as chol_solve's Ũ (row j of Ũ = column j of L
// times L_jj, 1/Ũ_jj = 1/L_jj², so that Ũᵀ diag(1/Ũ_jj) Ũ = L Lᵀ), then chol_solve. One read of L
// for both triangular solves, where the library's batched trsm reads it twice
// (dqp.solvers.fused.chol_solve_vec). Shared memory, in doubles: Ũ (k × (k|1), slack DQP_PAD) and
// 3 k-vectors.
#define DQP_CHOL_SOLVE_WORDS(k) ((long long)(k) * ((k) | 1) + DQP_PAD + 3LL * (k))

KERNEL dqp_chol_solve_vec(const double* __restrict__ L, int sL, int k, int cm, double* __restrict__ x, int sx)
{
    const long long e = BID;
    L += e * sL;
    x += e * sx;
    double* sm = dqp_smem;
    const int ld = k | 1;
    double* U = sm; sm += (long long)k * ld + DQP_PAD;
    double* dg = sm; sm += k;       // L_jj
    double* invd = sm; sm += k;     // 1/L_jj²
    double* xs = sm;
    for (int j = TID; j < k; j += NT) {
        const double v = L[(long long)j * k + j];
        dg[j] = v;
        invd[j] = DQP_RCP(v * v);
        xs[j] = x[j];
    }
    SYNC();
    // (t runs over memory: consecutive threads read consecutive entries)
    for (long long t = TID; t < (long long)k * k; t += NT) {
        const int r = (int)(t / k), c = (int)(t % k);
        const int i = cm ? c : r, j = cm ? r : c;          // the entry L[i, j]
        if (j <= i) U[(long long)j * ld + i] = L[t] * dg[j];
    }
    SYNC();
    chol_solve(U, k, ld, invd, xs);      // (ends with a barrier)
    for (int j = TID; j < k; j += NT) x[j] = xs[j];
}

#if defined(DQP_CPU) && !defined(DQP_CPU_THREADS)
// dqp_chol_block for blocks b0..b1−1 (the C++ build: one thread per block)
extern "C" void dqp_chol_block_cpu(double* A, int sA, int lda, int nb, double* Dinv, int* info, int j0,
                                   int b0, int b1)
{
    double* buf = (double*)std::malloc(sizeof(double) * (DQP_CHOL_BLOCK_WORDS(nb) + 1));
    dqp_smem = buf;
    for (int blk = b0; blk < b1; ++blk) {
        dqp_block_id = blk;
        dqp_chol_block(A, sA, lda, nb, Dinv, info, j0);
    }
    std::free(buf);
}

// dqp_chol_solve_vec for blocks b0..b1−1 (the C++ build: one thread per block)
extern "C" void dqp_chol_solve_vec_cpu(const double* L, int sL, int k, int cm, double* x, int sx, int b0, int b1)
{
    double* buf = (double*)std::malloc(sizeof(double) * (DQP_CHOL_SOLVE_WORDS(k) + 1));
    dqp_smem = buf;
    for (int blk = b0; blk < b1; ++blk) {
        dqp_block_id = blk;
        dqp_chol_solve_vec(L, sL, k, cm, x, sx);
    }
    std::free(buf);
}
#endif

// Shared memory the kernel needs, in doubles (the layout at the top of dqp_ipm_dual, and a slot for
// the int flag; dqp.solvers.fused.smem_bytes computes the same for the CUDA launch).
#define DQP_SMEM_WORDS(k, n, m) ((long long)(k) * ((k) | 1) + DQP_PAD + 13LL * (k) + (11LL + NWARPS) * (n) \
                                 + 3LL * ((m) + 1) + (NWARPS + 1LL) * MAXRED + 1)

// The host entry points' parameters (the kernel's, with the block range b0..b1 instead of the
// profile counters) and the kernel call that forwards them: one list for both C++ entry points.
#define DQP_HOST_PARAMS \
    const double* P, int sP, const double* q, int sq, const double* C, int sC, const double* d, int sd, \
    const double* A, int sA, const double* b, int sb, const double* M, int sM, const double* PiAbt, int sPi, \
    const double* Piq, const double* g, const double* norms, \
    const double* z0, const double* s0, const double* mu0, const double* lam0, const double* delta0, \
    double* z_out, double* s_out, double* mu_out, double* lam_out, long long* status_out, long long* iters_out, \
    const double* sc, unsigned char* act_out, long long* pflag_out, double* LS_out, \
    int n, int m, int p, int max_iter, int stall_iters, int separate_steps, int polish_rounds, \
    double eps, double eps_inf, double step_fraction, double reg_d, double wlo, double eps2, double eps_mid, int start, \
    int b0, int b1
#define DQP_KERNEL_CALL \
    dqp_ipm_dual(P, sP, q, sq, C, sC, d, sd, A, sA, b, sb, M, sM, PiAbt, sPi, Piq, g, norms, \
                 z0, s0, mu0, lam0, delta0, z_out, s_out, mu_out, lam_out, status_out, iters_out, \
                 sc, act_out, pflag_out, LS_out, n, m, p, max_iter, stall_iters, separate_steps, polish_rounds, \
                 eps, eps_inf, step_fraction, reg_d, wlo, eps2, eps_mid, start, nullptr)

#ifdef DQP_CPU_THREADS
// Runs body(t) on DQP_THREADS new threads as one block (thread t: TID = t), with a fresh block context
// (the schedule of dqp_threads_schedule) and dqp_smem = smem, block id blk.
template <class F>
static void dqp_run_block(double* smem, int blk, F body) {
    DqpBlock ctx;
    std::vector<std::thread> th;
    th.reserve(NT);
    for (int t = 0; t < NT; ++t)
        th.emplace_back([&, t] {
            dqp_tid = t;
            dqp_blk = &ctx;
            dqp_xpar = 0;
            dqp_smem = smem;
            dqp_block_id = blk;
            if (ctx.order) ctx.go[t]->take();           // (serialized: wait for the first turn)
            body(t);
            if (ctx.order) {
                ctx.at[t] = -2;
                dqp_yield(&ctx);
            }
        });
    if (ctx.order) ctx.go[ctx.next()]->give();
    for (auto& x_ : th) x_.join();
}

// chol_upper on DQP_THREADS threads (see the top of the file), W and invd in place; then, where x is
// given and the factorization succeeded, chol_solve: x ← S⁻¹ x. Returns the factorization's flag
// (−1: the threads disagreed).
extern "C" int dqp_chol_upper_threads(double* W, const double* Mdg, const double* Sd, int k, int ld,
                                      double* invd, const double* cm, double* x) {
    int flag = -1;
    std::vector<int> ret(NT);
    dqp_run_block(nullptr, 0, [&](int t) {
        ret[t] = chol_upper(W, Mdg, Sd, k, ld, invd, &flag, cm);
        if (x && ret[t] == 1) chol_solve(W, k, ld, invd, x);
    });
    for (int t = 1; t < NT; ++t)
        if (ret[t] != ret[0]) return -1;
    return ret[0];
}

// The whole kernel, dqp_ipm_dual_cpu's arguments: blocks b0..b1−1 one after the other, each run by
// DQP_THREADS threads on a "shared memory" of the CUDA launch's size (dqp.solvers.fused.smem_bytes,
// NWARPS = DQP_THREADS/32 warps), filled with NaNs first (CUDA's shared memory is not initialized:
// a value read before it is written shows).
extern "C" void dqp_ipm_dual_threads(
    DQP_HOST_PARAMS)
{
    std::vector<double> buf(DQP_SMEM_WORDS(m + p, n, m));
    for (int blk = b0; blk < b1; ++blk) {
        for (auto& w : buf) w = std::nan("");
        dqp_run_block(buf.data(), blk, [&](int) {
            DQP_KERNEL_CALL;
        });
    }
}
// dqp_chol_block for blocks b0..b1−1, each run by DQP_THREADS threads on a NaN-filled "shared memory"
extern "C" void dqp_chol_block_threads(double* A, int sA, int lda, int nb, double* Dinv, int* info, int j0,
                                       int b0, int b1)
{
    std::vector<double> buf(DQP_CHOL_BLOCK_WORDS(nb) + 1);
    for (int blk = b0; blk < b1; ++blk) {
        for (auto& w : buf) w = std::nan("");
        dqp_run_block(buf.data(), blk, [&](int) {
            dqp_chol_block(A, sA, lda, nb, Dinv, info, j0);
        });
    }
}
// dqp_chol_solve_vec for blocks b0..b1−1, each run by DQP_THREADS threads on a NaN-filled "shared memory"
extern "C" void dqp_chol_solve_vec_threads(const double* L, int sL, int k, int cm, double* x, int sx, int b0, int b1)
{
    std::vector<double> buf(DQP_CHOL_SOLVE_WORDS(k) + 1);
    for (int blk = b0; blk < b1; ++blk) {
        for (auto& w : buf) w = std::nan("");
        dqp_run_block(buf.data(), blk, [&](int) {
            dqp_chol_solve_vec(L, sL, k, cm, x, sx);
        });
    }
}
#endif

#if defined(DQP_CPU) && !defined(DQP_CPU_THREADS)
extern "C" void dqp_ipm_dual_cpu(
    DQP_HOST_PARAMS)
{
    double* buf = (double*)std::malloc(sizeof(double) * (DQP_SMEM_WORDS(m + p, n, m) + 1));
    dqp_smem = buf;
    for (int blk = b0; blk < b1; ++blk) {
        dqp_block_id = blk;
        DQP_KERNEL_CALL;
    }
    std::free(buf);
}
#endif
