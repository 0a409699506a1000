//! Channel soft exit's MLP: a gated MLP (`silu(gate) * up`, then the down
//! projection) that reads only the weights of the channels some row keeps.
//!
//! Each token's entries whose magnitude is below a threshold count as zero: the
//! MLP input's entries below `t_in`, the down projection input's below `t_mid`.
//! A dense kernel multiplies those zeros anyway and reads every weight; at
//! decode with one or two rows the MLP's time is the time to read its weights,
//! so the only way to turn the zeros into time is not to read the weights they
//! multiply. Here the weights are stored channel-major — row `i` of `gate_up`
//! holds input channel `i`'s weights to every gate and up output, row `k` of
//! `down` intermediate channel `k`'s weights to every output — so a kept
//! channel's weights are one contiguous run, and a channel no row keeps is not
//! read at all. The result is the masked dense MLP's (up to float rounding: the
//! sums run in a different order than a GEMM's).
//!
//! Every output is a sum over the kept channels in increasing channel order, in
//! fixed chunks of kept channels whose partial sums are added in chunk order: the
//! chunks follow the channel list, not the thread count, so results do not
//! depend on the number of threads.
//! Masks follow the float comparison `!(|v| < t)`: a NaN entry is kept (and makes
//! its sums NaN, as in the dense MLP), a threshold of 0 keeps every entry.
//!
//! The chunks run on rayon's pool, or, once [`set_parallel_for`] has been given
//! one, through an external `parallel_for` such as torch's `torch_parallel_for`:
//! inside a serving engine that puts them on the engine's own intra-op threads,
//! under the thread count and CPU binding the engine gave them, instead of on a
//! second pool of threads competing with the first for the same cores.

use rayon::prelude::*;
use std::ffi::c_void;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The body an external `parallel_for` runs on a range of task indices.
pub type ParallelBody = unsafe extern "C" fn(begin: i64, end: i64, ctx: *mut c_void);

/// An external `parallel_for`: runs `body(b, e, ctx)` over sub-ranges `[b, e)` covering
/// `[begin, end)` exactly once, on as many threads as it likes, and returns 0 on success. Torch's
/// `torch_parallel_for` (exported by `libtorch_cpu` since torch 2.10) has this signature.
pub type ParallelFor = unsafe extern "C" fn(
    begin: i64,
    end: i64,
    grain_size: i64,
    body: ParallelBody,
    ctx: *mut c_void,
) -> i32;

/// The external `parallel_for`'s address; 0: rayon's pool.
static PARALLEL_FOR: AtomicUsize = AtomicUsize::new(0);

/// Where the kernel's parallel tasks run.
#[derive(Clone, Copy)]
pub enum Parallel {
    /// rayon's global pool.
    Rayon,
    /// An external `parallel_for` (see [`ParallelFor`]).
    External(ParallelFor),
}

/// Run [`gated_mlp`]'s tasks through the `parallel_for` at `address` (0: back to rayon's pool).
///
/// # Safety
/// `address` must be 0 or the address of a function with the [`ParallelFor`] signature and contract,
/// valid for as long as the process calls [`gated_mlp`].
pub unsafe fn set_parallel_for(address: usize) {
    PARALLEL_FOR.store(address, Ordering::SeqCst);
}

/// What [`set_parallel_for`] last set.
pub fn parallel() -> Parallel {
    match PARALLEL_FOR.load(Ordering::SeqCst) {
        0 => Parallel::Rayon,
        // SAFETY: `set_parallel_for`'s caller vouched for the address.
        a => Parallel::External(unsafe { std::mem::transmute::<usize, ParallelFor>(a) }),
    }
}

/// `task(i)` for every `i < n`, each exactly once, in parallel as `par` says.
fn run_tasks(n: usize, par: Parallel, task: &(dyn Fn(usize) + Sync)) -> Result<(), String> {
    match par {
        Parallel::Rayon => {
            (0..n).into_par_iter().for_each(task);
            Ok(())
        }
        Parallel::External(parallel_for) => {
            struct Ctx<'a> {
                task: &'a (dyn Fn(usize) + Sync),
                panicked: AtomicBool,
            }
            unsafe extern "C" fn body(begin: i64, end: i64, ctx: *mut c_void) {
                // SAFETY: `ctx` is the `Ctx` below, alive until `parallel_for` returns.
                let ctx = unsafe { &*(ctx as *const Ctx) };
                // a panic must not unwind into the caller's C++ frames
                if catch_unwind(AssertUnwindSafe(|| {
                    (begin..end).for_each(|i| (ctx.task)(i as usize))
                }))
                .is_err()
                {
                    ctx.panicked.store(true, Ordering::SeqCst);
                }
            }
            let ctx = Ctx {
                task,
                panicked: AtomicBool::new(false),
            };
            // SAFETY: the contract of `ParallelFor`; `ctx` outlives the call.
            let rc =
                unsafe { parallel_for(0, n as i64, 1, body, &ctx as *const Ctx as *mut c_void) };
            if rc != 0 {
                return Err(format!(
                    "the external parallel_for failed (error code {rc})"
                ));
            }
            if ctx.panicked.load(Ordering::SeqCst) {
                return Err("a kernel task panicked".into());
            }
            Ok(())
        }
    }
}

/// Floats at the start of a weight row fetched ahead of use (eight cache lines).
const PREFETCH_FLOATS: usize = 128;

#[inline(always)]
fn prefetch(data: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    for line in data.chunks(16) {
        // SAFETY: a prefetch is a hint; the address is inside `data`.
        unsafe {
            std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                line.as_ptr() as *const i8
            )
        };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = data;
}

/// Kept channels per parallel task (see [`product`]).
const CHANNELS_PER_TASK: usize = 128;

/// How many channels some row kept: `input` of the MLP's input (gate/up rows
/// read), `inner` of the down projection's input (down rows read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Kept {
    pub input: usize,
    pub inner: usize,
}

/// SiLU as torch computes it on CPU: `v / (1 + exp(-v))`.
#[inline]
pub fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

#[inline]
fn kept(v: f32, t: f32) -> bool {
    v.abs() >= t || v.is_nan()
}

/// `acc[r, :] += Σ_c src[r, c] * w[c, :]` over `channels` in increasing order: `src @ w` restricted to
/// the given rows of `w` (`[_, width]`, row-major). Four channels per pass (four weight rows streamed at
/// once, the accumulator read and written once per four), the additions still one channel after
/// another, so the sum is the sequential one.
#[inline(always)]
fn accumulate_impl(
    acc: &mut [f32],
    rows: usize,
    src: &[f32],
    src_stride: usize,
    w: &[f32],
    width: usize,
    channels: &[usize],
) {
    let row = |c: usize| &w[c * width..(c + 1) * width];
    let mut groups = channels.chunks_exact(4);
    let mut next = 4;
    for g in &mut groups {
        // the next group's rows start where the CPU's prefetcher has no stream yet (a dropped channel
        // leaves a gap): ask for their first cache lines now
        for &c in channels
            .get(next..(next + 4).min(channels.len()))
            .unwrap_or(&[])
        {
            prefetch(&row(c)[..width.min(PREFETCH_FLOATS)]);
        }
        next += 4;
        let (w0, w1, w2, w3) = (row(g[0]), row(g[1]), row(g[2]), row(g[3]));
        for r in 0..rows {
            let s = &src[r * src_stride..(r + 1) * src_stride];
            let (a0, a1, a2, a3) = (s[g[0]], s[g[1]], s[g[2]], s[g[3]]);
            let out = &mut acc[r * width..(r + 1) * width];
            for ((((o, &p), &q), &u), &v) in out.iter_mut().zip(w0).zip(w1).zip(w2).zip(w3) {
                *o = (((*o + a0 * p) + a1 * q) + a2 * u) + a3 * v;
            }
        }
    }
    for &c in groups.remainder() {
        let wc = row(c);
        for r in 0..rows {
            let a0 = src[r * src_stride + c];
            for (o, &p) in acc[r * width..(r + 1) * width].iter_mut().zip(wc) {
                *o += a0 * p;
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn accumulate_avx2(
    acc: &mut [f32],
    rows: usize,
    src: &[f32],
    src_stride: usize,
    w: &[f32],
    width: usize,
    channels: &[usize],
) {
    accumulate_impl(acc, rows, src, src_stride, w, width, channels)
}

/// [`accumulate_impl`] compiled for AVX2 where the CPU has it (8 floats per instruction; no fused
/// multiply-add, so the values are the same as without it).
fn accumulate(
    acc: &mut [f32],
    rows: usize,
    src: &[f32],
    src_stride: usize,
    w: &[f32],
    width: usize,
    channels: &[usize],
) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2, checked just above.
        return unsafe { accumulate_avx2(acc, rows, src, src_stride, w, width, channels) };
    }
    accumulate_impl(acc, rows, src, src_stride, w, width, channels)
}

/// Per row, the entries `value(r, i)` for `i < width` that `t` keeps (the others zero), and the
/// columns some row keeps, in increasing order.
fn masked(
    rows: usize,
    width: usize,
    t: f32,
    value: impl Fn(usize, usize) -> f32,
) -> (Vec<f32>, Vec<usize>) {
    let mut out = vec![0.0f32; rows * width];
    let mut active = Vec::with_capacity(width);
    for i in 0..width {
        let mut any = false;
        for r in 0..rows {
            let v = value(r, i);
            if kept(v, t) {
                out[r * width + i] = v;
                any = true;
            }
        }
        if any {
            active.push(i);
        }
    }
    (out, active)
}

/// `dst[r, :] = src[r, :] @ w` (`w` is `[_, width]`) summed over the rows of `w` listed in `channels`
/// only. The listed channels split into chunks of [`CHANNELS_PER_TASK`], one parallel task each, which
/// reads its channels' whole rows (one contiguous stream per channel, neighbours adjacent in memory:
/// what lets the CPU prefetch) into a partial sum of its own; the partial sums are then added in chunk
/// order. The chunks are fixed by the channel list, not by the thread count, so neither is the result.
#[allow(clippy::too_many_arguments)]
fn product(
    src: &[f32],
    rows: usize,
    src_stride: usize,
    w: &[f32],
    width: usize,
    channels: &[usize],
    dst: &mut [f32],
    par: Parallel,
) -> Result<(), String> {
    let size = rows * width;
    let tasks = channels.len().div_ceil(CHANNELS_PER_TASK);
    let mut partials = vec![0.0f32; tasks * size];
    /// The partial sums' base pointer, shared by the tasks (each writes only its own slice).
    struct Base(*mut f32);
    // SAFETY: the tasks write disjoint slices of the buffer it points into.
    unsafe impl Sync for Base {}
    impl Base {
        fn at(&self, offset: usize) -> *mut f32 {
            self.0.wrapping_add(offset)
        }
    }
    let base = Base(partials.as_mut_ptr());
    let task = |i: usize| {
        let chunk =
            &channels[i * CHANNELS_PER_TASK..((i + 1) * CHANNELS_PER_TASK).min(channels.len())];
        // SAFETY: task `i` (run once) alone touches floats `i * size..(i + 1) * size`, inside the buffer.
        let acc = unsafe { std::slice::from_raw_parts_mut(base.at(i * size), size) };
        accumulate(acc, rows, src, src_stride, w, width, chunk);
    };
    run_tasks(tasks, par, &task)?;
    dst.fill(0.0);
    for acc in partials.chunks_exact(size.max(1)) {
        for (d, &p) in dst.iter_mut().zip(acc) {
            *d += p;
        }
    }
    Ok(())
}

/// `out = down(mask_mid(silu(g) * u))` with `[g | u] = gate_up(mask_in(x))`, per row.
///
/// `x`: `[rows, hidden]`; `gate_up`: `[hidden, 2 * inter]` (channel-major, gate
/// outputs first); `down`: `[inter, hidden]`; `out`: `[rows, hidden]`, written. The tasks run as
/// `par` says ([`parallel`]: what [`set_parallel_for`] chose).
#[allow(clippy::too_many_arguments)]
pub fn gated_mlp(
    x: &[f32],
    rows: usize,
    hidden: usize,
    inter: usize,
    gate_up: &[f32],
    down: &[f32],
    t_in: f32,
    t_mid: f32,
    out: &mut [f32],
    par: Parallel,
) -> Result<Kept, String> {
    let wide = 2 * inter;
    if x.len() != rows * hidden || out.len() != rows * hidden {
        return Err(format!(
            "x and out must hold rows*hidden = {} values (got {} and {})",
            rows * hidden,
            x.len(),
            out.len()
        ));
    }
    if gate_up.len() != hidden * wide || down.len() != inter * hidden {
        return Err(format!(
            "gate_up must be [hidden, 2*inter] = [{hidden}, {wide}] and down [inter, hidden] = [{inter}, {hidden}] \
             (got {} and {} values)",
            gate_up.len(),
            down.len()
        ));
    }
    if rows == 0 || hidden == 0 {
        return Ok(Kept { input: 0, inner: 0 });
    }
    if inter == 0 {
        out.fill(0.0);
        return Ok(Kept { input: 0, inner: 0 });
    }

    // the masked input and the channels some row keeps, then gate/up over those channels only
    let (xm, active_in) = masked(rows, hidden, t_in, |r, i| x[r * hidden + i]);
    let mut h = vec![0.0f32; rows * wide];
    product(&xm, rows, hidden, gate_up, wide, &active_in, &mut h, par)?;
    // the activation, the inner mask, and down over the intermediate channels some row keeps
    let (a, active_mid) = masked(rows, inter, t_mid, |r, k| {
        silu(h[r * wide + k]) * h[r * wide + inter + k]
    });
    product(&a, rows, inter, down, hidden, &active_mid, out, par)?;
    Ok(Kept {
        input: active_in.len(),
        inner: active_mid.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// [`gated_mlp`] on rayon's pool.
    #[allow(clippy::too_many_arguments)]
    fn on_rayon(
        x: &[f32],
        rows: usize,
        hidden: usize,
        inter: usize,
        gu: &[f32],
        dn: &[f32],
        t_in: f32,
        t_mid: f32,
        out: &mut [f32],
    ) -> Result<Kept, String> {
        gated_mlp(
            x,
            rows,
            hidden,
            inter,
            gu,
            dn,
            t_in,
            t_mid,
            out,
            Parallel::Rayon,
        )
    }

    /// The masked dense MLP in f64, weights in torch's `[out, in]` layout.
    #[allow(clippy::too_many_arguments)]
    fn reference(
        x: &[f32],
        rows: usize,
        hidden: usize,
        inter: usize,
        gu: &[f32],
        dn: &[f32],
        t_in: f32,
        t_mid: f32,
    ) -> Vec<f64> {
        let wide = 2 * inter;
        let mut out = vec![0.0f64; rows * hidden];
        for r in 0..rows {
            let xm: Vec<f64> = (0..hidden)
                .map(|i| {
                    let v = x[r * hidden + i];
                    if kept(v, t_in) {
                        v as f64
                    } else {
                        0.0
                    }
                })
                .collect();
            let h: Vec<f64> = (0..wide)
                .map(|j| (0..hidden).map(|i| xm[i] * gu[i * wide + j] as f64).sum())
                .collect();
            for k in 0..inter {
                let v = (silu(h[k] as f32) * h[inter + k] as f32) as f64;
                if !kept(v as f32, t_mid) {
                    continue;
                }
                for c in 0..hidden {
                    out[r * hidden + c] += v * dn[k * hidden + c] as f64;
                }
            }
        }
        out
    }

    fn pseudo(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matches_the_masked_dense_mlp() {
        for &(rows, hidden, inter) in &[(1, 7, 5), (2, 600, 700), (3, 96, 513)] {
            let x = pseudo(rows * hidden, 1);
            let gu = pseudo(hidden * 2 * inter, 2);
            let dn = pseudo(inter * hidden, 3);
            for &(t_in, t_mid) in &[(0.0, 0.0), (0.3, 0.0), (0.0, 0.5), (0.5, 1.0), (2.0, 0.0)] {
                let mut out = vec![f32::NAN; rows * hidden];
                let kept =
                    on_rayon(&x, rows, hidden, inter, &gu, &dn, t_in, t_mid, &mut out).unwrap();
                assert!(kept.input <= hidden && kept.inner <= inter);
                let want = reference(&x, rows, hidden, inter, &gu, &dn, t_in, t_mid);
                for (o, w) in out.iter().zip(&want) {
                    assert!(
                        (*o as f64 - w).abs() <= 1e-3 * (1.0 + w.abs()),
                        "{o} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn counts_the_channels_some_row_keeps() {
        // Row 0 keeps channel 0 only, row 1 channel 2 only: channels 0 and 2 are read.
        let x = [1.0, 0.1, 0.0, 0.0, 0.1, -1.0];
        let (gu, dn) = (vec![1.0f32; 3 * 4], vec![1.0f32; 2 * 3]);
        let mut out = [0.0f32; 6];
        let kept = on_rayon(&x, 2, 3, 2, &gu, &dn, 0.5, 0.0, &mut out).unwrap();
        assert_eq!(kept.input, 2);
        assert_eq!(kept.inner, 2);
    }

    #[test]
    fn nan_is_kept_and_threshold_zero_keeps_everything() {
        let x = [f32::NAN, 0.0];
        let (gu, dn) = (vec![1.0f32; 2 * 2], vec![1.0f32; 2]);
        let mut out = [0.0f32; 2];
        let kept = on_rayon(&x, 1, 2, 1, &gu, &dn, 10.0, 0.0, &mut out).unwrap();
        assert_eq!(kept.input, 1);
        assert!(out.iter().all(|v| v.is_nan()));
        let kept = on_rayon(&[0.0, 0.0], 1, 2, 1, &gu, &dn, 0.0, 0.0, &mut out).unwrap();
        assert_eq!((kept.input, kept.inner), (2, 1));
        assert_eq!(out, [0.0, 0.0]);
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let mut out = [0.0f32; 2];
        assert!(on_rayon(&[0.0; 3], 1, 2, 1, &[0.0; 4], &[0.0; 2], 0.0, 0.0, &mut out).is_err());
        assert!(on_rayon(&[0.0; 2], 1, 2, 1, &[0.0; 3], &[0.0; 2], 0.0, 0.0, &mut out).is_err());
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let (rows, hidden, inter) = (2, 576, 1536);
        let x = pseudo(rows * hidden, 4);
        let gu = pseudo(hidden * 2 * inter, 5);
        let dn = pseudo(inter * hidden, 6);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut out = vec![0.0f32; rows * hidden];
            pool.install(|| {
                on_rayon(&x, rows, hidden, inter, &gu, &dn, 0.2, 0.1, &mut out).unwrap()
            });
            out
        };
        assert_eq!(run(1), run(3));
    }

    /// A `parallel_for` as torch's: the range in two halves, each on its own thread.
    unsafe extern "C" fn two_threads(
        begin: i64,
        end: i64,
        _grain: i64,
        body: ParallelBody,
        ctx: *mut c_void,
    ) -> i32 {
        let (mid, ctx) = ((begin + end) / 2, ctx as usize);
        std::thread::scope(|s| {
            for (b, e) in [(begin, mid), (mid, end)] {
                // SAFETY: the contract of `ParallelBody`, as `run_tasks` passes it.
                s.spawn(move || unsafe { body(b, e, ctx as *mut c_void) });
            }
        });
        0
    }

    unsafe extern "C" fn refuses(_: i64, _: i64, _: i64, _: ParallelBody, _: *mut c_void) -> i32 {
        7
    }

    #[test]
    fn an_external_parallel_for_gives_the_same_result() {
        let (rows, hidden, inter) = (3, 576, 1536);
        let x = pseudo(rows * hidden, 7);
        let gu = pseudo(hidden * 2 * inter, 8);
        let dn = pseudo(inter * hidden, 9);
        let run = |par| {
            let mut out = vec![f32::NAN; rows * hidden];
            let kept = gated_mlp(&x, rows, hidden, inter, &gu, &dn, 0.1, 0.05, &mut out, par);
            (kept.unwrap(), out)
        };
        assert_eq!(run(Parallel::Rayon), run(Parallel::External(two_threads)));
    }

    #[test]
    fn a_failing_parallel_for_is_an_error() {
        let (gu, dn) = (vec![1.0f32; 2 * 2], vec![1.0f32; 2]);
        let mut out = [0.0f32; 2];
        let err = gated_mlp(
            &[1.0, 1.0],
            1,
            2,
            1,
            &gu,
            &dn,
            0.0,
            0.0,
            &mut out,
            Parallel::External(refuses),
        );
        assert_eq!(
            err.unwrap_err(),
            "the external parallel_for failed (error code 7)"
        );
    }
}
