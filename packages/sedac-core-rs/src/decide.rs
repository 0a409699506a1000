//! Per-token exit decisions: the V6.0 threshold rule, the V6.1 confidence
//! accumulation with soft exit, the V7 consecutive-similarity rule, quantile
//! calibration and the adaptive threshold state.

use rayon::prelude::*;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

/// Thresholds never go below this value (a zero threshold would divide by zero
/// in the confidence formula).
pub const MIN_THRESHOLD: f32 = 1e-6;

/// Below this many tokens the work is done on the calling thread.
const PAR_MIN_TOKENS: usize = 16 * 1024;
/// Tokens per parallel work item.
const CHUNK_TOKENS: usize = 4 * 1024;

/// Which rule turns per-checkpoint risk into an exit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// V6.0: exit at the first checkpoint whose risk is below its threshold.
    Threshold,
    /// V6.1: exit at the first checkpoint whose accumulated confidence reaches
    /// that checkpoint's target exit rate.
    Confidence,
}

impl Rule {
    pub fn from_code(code: u8) -> Option<Rule> {
        match code {
            0 => Some(Rule::Threshold),
            1 => Some(Rule::Confidence),
            _ => None,
        }
    }
}

/// Adaptive confidence decay (the V6.1 roadmap's `adaptive_confidence_decay`):
/// at checkpoint i a token's decay is
/// `clamp01(decay * (1 - clamp01(risk_i / thr_i * 0.5)) * (1 + bonus * history))`:
/// uncertain tokens (risk near or above the threshold) forget their accumulated
/// confidence, and a history of exits (`history` in [0, 1], kept by the caller)
/// lets confidence last longer. NaN propagates, as with the fixed decay.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdaptiveDecay {
    pub bonus: f32,
    pub history: f32,
}

/// Clamp to [0, 1], keeping NaN (`f32::clamp` returns NaN for NaN).
#[inline(always)]
pub fn clamp01(x: f32) -> f32 {
    x.clamp(0.0, 1.0)
}

/// The per-checkpoint parameters of a V6 probe rule, all of length `checkpoints`.
#[derive(Clone, Copy, Debug)]
pub struct ProbeParams<'a> {
    pub thresholds: &'a [f32],
    pub targets: &'a [f32],
    pub weights: &'a [f32],
    pub decay: f32,
    pub rule: Rule,
    /// None: the fixed decay of the original formula.
    pub adaptive: Option<AdaptiveDecay>,
}

impl<'a> ProbeParams<'a> {
    pub fn checkpoints(&self) -> usize {
        self.thresholds.len()
    }

    fn check(&self) -> Result<(), String> {
        let c = self.thresholds.len();
        if self.targets.len() != c || self.weights.len() != c {
            return Err(format!(
                "probe rule parameters disagree in length: {} thresholds, {} targets, {} weights",
                c,
                self.targets.len(),
                self.weights.len()
            ));
        }
        Ok(())
    }

    /// Decide one token. `sink(i, C_i)` receives the accumulated confidence at
    /// every checkpoint (also after the exit); returns the exit checkpoint or -1.
    ///
    /// conf_i = (thr_i - risk_i) / thr_i;  C_i = C_{i-1} * gamma_i + conf_i * w_i,
    /// gamma_i = decay, or the adaptive decay (see [`AdaptiveDecay`]).
    /// A NaN risk never exits: it fails both comparisons, and under the
    /// confidence rule it makes C NaN for the remaining checkpoints.
    // One index walks five parallel slices; an iterator zip would hide that.
    #[allow(clippy::needless_range_loop)]
    #[inline(always)]
    pub fn decide<F: FnMut(usize, f32)>(&self, risk: &[f32], mut sink: F) -> i32 {
        let mut acc = 0.0f32;
        let mut exit = -1i32;
        for i in 0..self.thresholds.len() {
            let r = risk[i];
            let thr = self.thresholds[i];
            let conf = (thr - r) / thr;
            let gamma = match self.adaptive {
                None => self.decay,
                Some(a) => {
                    let u = clamp01(r / thr * 0.5);
                    clamp01(self.decay * (1.0 - u) * (1.0 + a.bonus * a.history))
                }
            };
            acc = acc * gamma + conf * self.weights[i];
            sink(i, acc);
            if exit < 0 {
                let hit = match self.rule {
                    Rule::Threshold => r < thr,
                    Rule::Confidence => acc >= self.targets[i],
                };
                if hit {
                    exit = i as i32;
                }
            }
        }
        exit
    }
}

/// The original soft-exit steepness: tanh(2c - 1) * 0.5 + 0.5 is the logistic
/// 1 / (1 + exp(-4 (c - 0.5))).
pub const SOFT_K: f32 = 4.0;

/// Soft-exit ratio for accumulated confidence `c` with steepness `k` (the V6.1
/// roadmap's `1 / (1 + exp(-k (c - 0.5)))`), computed as 1 / (1 + exp(0.5k - k c));
/// `k = 4` is exactly tanh(2c - 1) * 0.5 + 0.5, as 1 / (1 + exp(2 - 4c)).
/// Zero unless the token has positive accumulated confidence (NaN gives zero).
#[inline(always)]
pub fn skip_fraction_k(c: f32, k: f32) -> f32 {
    if c > 0.0 {
        1.0 / (1.0 + (0.5 * k - k * c).exp())
    } else {
        0.0
    }
}

/// [`skip_fraction_k`] with the original steepness.
#[inline(always)]
pub fn skip_fraction(c: f32) -> f32 {
    skip_fraction_k(c, SOFT_K)
}

/// Evaluate the probe rule for `out_exit.len()` tokens; `risk` is `[tokens, checkpoints]`
/// row-major, `out_conf` / `out_soft` likewise. `out_soft` is all zero when
/// `soft` is false.
pub fn evaluate(
    params: &ProbeParams,
    risk: &[f32],
    soft: bool,
    soft_k: f32,
    out_exit: &mut [i32],
    out_conf: &mut [f32],
    out_soft: &mut [f32],
) -> Result<(), String> {
    params.check()?;
    let c = params.checkpoints();
    let n = out_exit.len();
    if risk.len() != n * c || out_conf.len() != n * c || out_soft.len() != n * c {
        return Err(format!(
            "evaluate: buffer sizes do not match {n} tokens x {c} checkpoints"
        ));
    }
    if c == 0 {
        out_exit.fill(-1);
        return Ok(());
    }
    let run = |risk: &[f32], exit: &mut [i32], conf: &mut [f32], sr: &mut [f32]| {
        for (t, e) in exit.iter_mut().enumerate() {
            let row = &risk[t * c..(t + 1) * c];
            let conf_row = &mut conf[t * c..(t + 1) * c];
            let soft_row = &mut sr[t * c..(t + 1) * c];
            *e = params.decide(row, |i, acc| {
                conf_row[i] = acc;
                soft_row[i] = if soft { skip_fraction_k(acc, soft_k) } else { 0.0 };
            });
        }
    };
    if n < PAR_MIN_TOKENS {
        run(risk, out_exit, out_conf, out_soft);
    } else {
        out_exit
            .par_chunks_mut(CHUNK_TOKENS)
            .zip(out_conf.par_chunks_mut(CHUNK_TOKENS * c))
            .zip(out_soft.par_chunks_mut(CHUNK_TOKENS * c))
            .zip(risk.par_chunks(CHUNK_TOKENS * c))
            .for_each(|(((e, cf), s), r)| run(r, e, cf, s));
    }
    Ok(())
}

/// V7 rule for one token: the layer at which the first run of `k` consecutive
/// similarities >= `tau` ends, counting only layers >= `min_layer`; -1 if none.
/// NaN breaks a run.
#[inline(always)]
pub fn consecutive_token(sim: &[f32], tau: f32, k: usize, min_layer: usize) -> i32 {
    let mut run = 0usize;
    for (l, &s) in sim.iter().enumerate().skip(min_layer) {
        if s >= tau {
            run += 1;
            if run >= k {
                return l as i32;
            }
        } else {
            run = 0;
        }
    }
    -1
}

/// V7 rule for every token of a `[tokens, layers]` similarity matrix.
pub fn consecutive_exit(
    sim: &[f32],
    layers: usize,
    tau: f32,
    k: usize,
    min_layer: usize,
    out: &mut [i32],
) -> Result<(), String> {
    let n = out.len();
    if sim.len() != n * layers {
        return Err(format!(
            "consecutive_exit: buffer size {} does not match {n} tokens x {layers} layers",
            sim.len()
        ));
    }
    if k == 0 {
        return Err("consecutive_exit: k must be >= 1".to_string());
    }
    if layers == 0 {
        out.fill(-1);
        return Ok(());
    }
    let run = |sim: &[f32], out: &mut [i32]| {
        for (row, o) in sim.chunks_exact(layers).zip(out.iter_mut()) {
            *o = consecutive_token(row, tau, k, min_layer);
        }
    };
    if n < PAR_MIN_TOKENS {
        run(sim, out);
    } else {
        out.par_chunks_mut(CHUNK_TOKENS)
            .zip(sim.par_chunks(CHUNK_TOKENS * layers))
            .for_each(|(o, s)| run(s, o));
    }
    Ok(())
}

/// Quantile `q` of the finite values of `values` with linear interpolation
/// between order statistics (numpy's default method), computed in f64 and
/// rounded to f32. NaN when there is no finite value. Reorders `scratch`.
pub fn quantile_finite(values: impl Iterator<Item = f32>, q: f32, scratch: &mut Vec<f32>) -> f32 {
    scratch.clear();
    scratch.extend(values.filter(|v| v.is_finite()));
    let n = scratch.len();
    if n == 0 {
        return f32::NAN;
    }
    let pos = q as f64 * (n - 1) as f64;
    let lo = pos.floor() as usize;
    let lo = lo.min(n - 1);
    let frac = pos - lo as f64;
    let cmp = |a: &f32, b: &f32| a.partial_cmp(b).expect("finite values compare");
    let (_, &mut a, rest) = scratch.select_nth_unstable_by(lo, cmp);
    let b = if lo + 1 < n {
        rest.iter().copied().fold(f32::INFINITY, f32::min)
    } else {
        a
    };
    let (a, b) = (a as f64, b as f64);
    (a + (b - a) * frac) as f32
}

/// Per-column quantiles of a `[tokens, columns]` matrix; `rates` has one rate
/// per column. Columns are processed in parallel.
pub fn column_quantiles(risk: &[f32], rates: &[f32], out: &mut [f32]) -> Result<(), String> {
    let c = rates.len();
    if out.len() != c || (c == 0 && !risk.is_empty()) || (c > 0 && risk.len() % c != 0) {
        return Err(format!(
            "quantiles: buffer of {} values does not split into {c} columns",
            risk.len()
        ));
    }
    if c == 0 {
        return Ok(());
    }
    out.par_iter_mut().enumerate().for_each(|(i, o)| {
        let mut scratch = Vec::new();
        *o = quantile_finite(
            risk.iter().skip(i).step_by(c).copied(),
            rates[i],
            &mut scratch,
        );
    });
    Ok(())
}

/// Adaptive thresholds shared between threads: every threshold is an atomic
/// f32, so `evaluate` on one thread and `observe` on another never block each
/// other. Updates are EMA updates towards the quantile of the observed risk that
/// yields each checkpoint's target exit rate, after `warmup_observations` warm-up
/// observations.
pub struct ThresholdState {
    thresholds: Vec<AtomicU32>,
    targets: Vec<f32>,
    alpha: f32,
    warmup_observations: u64,
    adaptive: bool,
    observations: AtomicU64,
}

impl ThresholdState {
    pub fn new(
        thresholds: &[f32],
        targets: &[f32],
        alpha: f32,
        warmup_observations: u64,
        adaptive: bool,
    ) -> Result<Self, String> {
        if thresholds.len() != targets.len() {
            return Err(format!(
                "{} thresholds but {} target exit rates",
                thresholds.len(),
                targets.len()
            ));
        }
        Ok(ThresholdState {
            thresholds: thresholds
                .iter()
                .map(|t| AtomicU32::new(t.to_bits()))
                .collect(),
            targets: targets.to_vec(),
            alpha,
            warmup_observations,
            adaptive,
            observations: AtomicU64::new(0),
        })
    }

    pub fn thresholds(&self) -> Vec<f32> {
        self.thresholds
            .iter()
            .map(|t| f32::from_bits(t.load(Ordering::Acquire)))
            .collect()
    }

    pub fn set_thresholds(&self, values: &[f32]) -> Result<(), String> {
        if values.len() != self.thresholds.len() {
            return Err(format!(
                "expected {} thresholds, got {}",
                self.thresholds.len(),
                values.len()
            ));
        }
        for (a, v) in self.thresholds.iter().zip(values) {
            a.store(v.to_bits(), Ordering::Release);
        }
        Ok(())
    }

    pub fn observations(&self) -> u64 {
        self.observations.load(Ordering::Acquire)
    }

    pub fn set_observations(&self, observations: u64) {
        self.observations.store(observations, Ordering::Release);
    }

    /// Count one observation of `[tokens, checkpoints]` risk and, once the
    /// warm-up is over and adaptation is on, move each threshold towards its
    /// quantile: thr <- max((1 - alpha) * thr + alpha * q, MIN_THRESHOLD).
    /// Non-finite risks are ignored; a checkpoint with no finite risk keeps its
    /// threshold. An empty batch is not counted. Returns whether any threshold
    /// was updated.
    pub fn observe(&self, risk: &[f32]) -> Result<bool, String> {
        let c = self.thresholds.len();
        if c == 0 || risk.len() % c != 0 {
            return Err(format!(
                "observe: buffer of {} values does not split into {c} checkpoints",
                risk.len()
            ));
        }
        if risk.is_empty() {
            return Ok(false);
        }
        let seen = self.observations.fetch_add(1, Ordering::AcqRel);
        if !self.adaptive || seen < self.warmup_observations {
            return Ok(false);
        }
        let mut q = vec![0.0f32; c];
        column_quantiles(risk, &self.targets, &mut q)?;
        let mut updated = false;
        for (atomic, &qi) in self.thresholds.iter().zip(&q) {
            if !qi.is_finite() {
                continue;
            }
            let alpha = self.alpha;
            let _ = atomic.fetch_update(Ordering::AcqRel, Ordering::Acquire, |bits| {
                let old = f32::from_bits(bits);
                Some(ema(old, qi, alpha).to_bits())
            });
            updated = true;
        }
        Ok(updated)
    }
}

/// One EMA rate of a threshold towards `target`, floored at [`MIN_THRESHOLD`].
#[inline]
pub fn ema(old: f32, target: f32, alpha: f32) -> f32 {
    let new = (1.0 - alpha) * old + alpha * target;
    new.max(MIN_THRESHOLD)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params<'a>(thr: &'a [f32], tgt: &'a [f32], w: &'a [f32], rule: Rule) -> ProbeParams<'a> {
        ProbeParams {
            thresholds: thr,
            targets: tgt,
            weights: w,
            decay: 0.9,
            rule,
            adaptive: None,
        }
    }

    #[test]
    fn threshold_rule_exits_at_first_checkpoint_below_threshold() {
        let (thr, tgt, w) = ([1.0, 1.0, 1.0], [0.5; 3], [1.0; 3]);
        let c = params(&thr, &tgt, &w, Rule::Threshold);
        assert_eq!(c.decide(&[2.0, 0.5, 0.1], |_, _| {}), 1);
        assert_eq!(c.decide(&[2.0, 2.0, 2.0], |_, _| {}), -1);
        // exactly at the threshold is not below it
        assert_eq!(c.decide(&[1.0, 1.0, 0.99], |_, _| {}), 2);
        assert_eq!(c.decide(&[f32::NAN, 0.0, 0.0], |_, _| {}), 1);
    }

    #[test]
    fn confidence_accumulates_with_decay_and_weights() {
        let (thr, tgt, w) = ([1.0, 2.0], [0.9, 0.5], [0.5, 1.0]);
        let c = params(&thr, &tgt, &w, Rule::Confidence);
        let mut seen = vec![];
        // conf0 = (1 - 0.5) / 1 = 0.5 -> C0 = 0.25 < 0.9
        // conf1 = (2 - 1) / 2 = 0.5   -> C1 = 0.25 * 0.9 + 0.5 = 0.725 >= 0.5
        let e = c.decide(&[0.5, 1.0], |i, acc| seen.push((i, acc)));
        assert_eq!(e, 1);
        assert_eq!(seen[0], (0, 0.25));
        assert!((seen[1].1 - 0.725).abs() < 1e-6);
        // NaN poisons the accumulation: no exit afterwards
        assert_eq!(c.decide(&[f32::NAN, -100.0], |_, _| {}), -1);
    }

    #[test]
    fn adaptive_decay_forgets_uncertain_tokens_and_keeps_confident_ones() {
        let thr = [1.0f32, 1.0];
        let tgt = [9.0f32, 9.0];
        let w = [1.0f32, 1.0];
        let mut cas = params(&thr, &tgt, &w, Rule::Confidence);
        cas.adaptive = Some(AdaptiveDecay {
            bonus: 0.0,
            history: 0.0,
        });
        let mut seen = vec![];
        // risk 0 at checkpoint 1: u = 0, gamma = decay
        cas.decide(&[0.5, 0.0], |i, a| seen.push((i, a)));
        assert_eq!(seen[1].1, 0.5 * 0.9 + 1.0);
        // risk >= 2 thr at checkpoint 1: u = 1, gamma = 0, the past is forgotten
        seen.clear();
        cas.decide(&[0.5, 3.0], |i, a| seen.push((i, a)));
        assert_eq!(seen[1].1, (1.0 - 3.0) / 1.0);
        // a history of exits lengthens memory, bounded by 1
        cas.adaptive = Some(AdaptiveDecay {
            bonus: 1.0,
            history: 1.0,
        });
        seen.clear();
        cas.decide(&[0.5, 0.0], |i, a| seen.push((i, a)));
        assert_eq!(seen[1].1, 0.5 * 1.0 + 1.0);
        assert!(clamp01(f32::NAN).is_nan());
    }

    #[test]
    fn soft_ratio_k_generalises_the_tanh_form() {
        for c in [0.1f32, 0.5, 0.9] {
            assert_eq!(skip_fraction_k(c, SOFT_K), skip_fraction(c));
            assert!(skip_fraction_k(c, 16.0) <= skip_fraction_k(c, 4.0) || c >= 0.5);
        }
        assert_eq!(skip_fraction_k(0.5, 7.0), 0.5);
    }

    #[test]
    fn soft_ratio_matches_tanh_form() {
        for &c in &[0.01f32, 0.25, 0.5, 0.8, 1.0, 3.0] {
            let expect = ((2.0 * c as f64 - 1.0).tanh() * 0.5 + 0.5) as f32;
            assert!((skip_fraction(c) - expect).abs() <= 1e-6 * expect, "{c}");
        }
        assert_eq!(skip_fraction(0.0), 0.0);
        assert_eq!(skip_fraction(-1.0), 0.0);
        assert_eq!(skip_fraction(f32::NAN), 0.0);
    }

    #[test]
    fn evaluate_parallel_equals_sequential() {
        let n = PAR_MIN_TOKENS * 2 + 17;
        let c = 3;
        let risk: Vec<f32> = (0..n * c)
            .map(|i| ((i * 7919) % 1000) as f32 / 500.0)
            .collect();
        let (thr, tgt, w) = ([0.8f32, 1.0, 1.2], [0.2f32, 0.6, 0.9], [0.3f32, 0.4, 0.3]);
        let cas = params(&thr, &tgt, &w, Rule::Confidence);
        let (mut e, mut cf, mut s) = (vec![0; n], vec![0.0; n * c], vec![0.0; n * c]);
        evaluate(&cas, &risk, true, SOFT_K, &mut e, &mut cf, &mut s).unwrap();
        for t in (0..n).step_by(997) {
            let mut conf = vec![0.0; c];
            let want = cas.decide(&risk[t * c..(t + 1) * c], |i, a| conf[i] = a);
            assert_eq!(e[t], want);
            assert_eq!(&cf[t * c..(t + 1) * c], &conf[..]);
            assert_eq!(s[t * c], skip_fraction(conf[0]));
        }
    }

    #[test]
    fn evaluate_rejects_mismatched_buffers() {
        let (thr, tgt, w) = ([1.0f32], [0.5f32], [1.0f32]);
        let cas = params(&thr, &tgt, &w, Rule::Threshold);
        let (mut e, mut cf, mut s) = (vec![0; 2], vec![0.0; 2], vec![0.0; 1]);
        assert!(evaluate(&cas, &[0.0, 0.0], false, SOFT_K, &mut e, &mut cf, &mut s).is_err());
    }

    #[test]
    fn consecutive_rule() {
        let s = [0.99, 0.5, 0.99, 0.99, 0.99];
        assert_eq!(consecutive_token(&s, 0.98, 1, 0), 0);
        assert_eq!(consecutive_token(&s, 0.98, 2, 0), 3);
        assert_eq!(consecutive_token(&s, 0.98, 3, 0), 4);
        assert_eq!(consecutive_token(&s, 0.98, 4, 0), -1);
        assert_eq!(consecutive_token(&s, 0.98, 2, 3), 4);
        assert_eq!(consecutive_token(&s, 0.98, 1, 9), -1);
        assert_eq!(consecutive_token(&[0.99, f32::NAN, 0.99], 0.98, 2, 0), -1);
        assert_eq!(consecutive_token(&s, 0.99, 1, 0), 0); // >= tau
    }

    #[test]
    fn quantile_matches_linear_interpolation() {
        let mut scratch = vec![];
        let v = [3.0f32, 1.0, f32::NAN, 2.0, 4.0, f32::INFINITY];
        assert_eq!(quantile_finite(v.iter().copied(), 0.0, &mut scratch), 1.0);
        assert_eq!(quantile_finite(v.iter().copied(), 1.0, &mut scratch), 4.0);
        assert_eq!(quantile_finite(v.iter().copied(), 0.5, &mut scratch), 2.5);
        assert!(quantile_finite([f32::NAN].iter().copied(), 0.5, &mut scratch).is_nan());
    }

    #[test]
    fn threshold_state_warms_up_then_follows_ema() {
        let st = ThresholdState::new(&[1.0], &[0.5], 0.5, 2, true).unwrap();
        let risk = [0.0f32, 2.0, 4.0]; // median 2.0
        assert!(!st.observe(&risk).unwrap());
        assert!(!st.observe(&risk).unwrap());
        assert!(!st.observe(&[]).unwrap()); // empty batches are not counted
        assert_eq!(st.observations(), 2);
        assert!(st.observe(&risk).unwrap());
        assert_eq!(st.thresholds(), vec![1.5]);
        // never below the floor
        let st = ThresholdState::new(&[1.0], &[0.0], 1.0, 0, true).unwrap();
        st.observe(&[-5.0, 0.0]).unwrap();
        assert_eq!(st.thresholds(), vec![MIN_THRESHOLD]);
    }

    #[test]
    fn threshold_state_is_safe_across_threads() {
        let st = std::sync::Arc::new(
            ThresholdState::new(&[1.0, 1.0], &[0.5, 0.5], 0.1, 0, true).unwrap(),
        );
        let risk: Vec<f32> = (0..2000).map(|i| (i % 100) as f32 / 50.0).collect();
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let (st, risk) = (st.clone(), risk.clone());
                std::thread::spawn(move || {
                    for _ in 0..50 {
                        st.observe(&risk).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(st.observations(), 200);
        for t in st.thresholds() {
            assert!(t.is_finite() && t > 0.9 && t < 1.1, "{t}");
        }
    }
}
