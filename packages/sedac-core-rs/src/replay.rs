//! Trace replay: evaluate many exit configurations over recorded per-token
//! signals at once, in parallel over token chunks, every chunk evaluating all
//! configurations while its rows are in cache.
//!
//! A trace row holds one token's signal per *position* (every layer for V7
//! similarity traces, every checkpoint for probe risk traces) and optionally a
//! `safe` label per position: 1 when cascading from that position (skipping the
//! MLP of every later, unprotected layer) keeps the full model's top-1.
//!
//! Exiting after layer `l` skips the MLPs of layers `l+1 .. num_layers-protect_last-1`.
//! A token counts as exited only if that range is non-empty.

use crate::decide::{consecutive_token, ProbeParams};
use rayon::prelude::*;

const CHUNK_TOKENS: usize = 2 * 1024;

/// Integer totals for one configuration; rates are derived by the caller.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counts {
    /// tokens that skipped at least one MLP
    pub exits: i64,
    /// skipped MLP blocks summed over tokens
    pub skipped_layers: i64,
    /// exited tokens whose `safe` label at the exit position is 0
    pub unsafe_exits: i64,
}

impl std::ops::AddAssign for Counts {
    fn add_assign(&mut self, o: Counts) {
        self.exits += o.exits;
        self.skipped_layers += o.skipped_layers;
        self.unsafe_exits += o.unsafe_exits;
    }
}

/// One V7 configuration.
#[derive(Clone, Copy, Debug)]
pub struct MonitorConfig {
    pub tau: f32,
    pub k: usize,
    pub min_layer: usize,
    pub protect_last: usize,
    /// per-layer scope: layer j's MLP is skipped while the run of high
    /// similarity ending at layer j-1 is at least k long, instead of cascading.
    pub per_layer: bool,
}

/// One probe (V6) configuration; hard exits only.
#[derive(Clone, Copy, Debug)]
pub struct ProbeConfig<'a> {
    pub params: ProbeParams<'a>,
    pub protect_last: usize,
}

#[inline(always)]
fn skipped_after(layer: usize, num_layers: usize, protect_last: usize) -> i64 {
    let end = num_layers.saturating_sub(protect_last) as i64;
    (end - (layer as i64 + 1)).max(0)
}

#[inline(always)]
fn record(c: &mut Counts, skipped: i64, safe: Option<u8>) {
    if skipped > 0 {
        c.exits += 1;
        c.skipped_layers += skipped;
        if safe == Some(0) {
            c.unsafe_exits += 1;
        }
    }
}

fn check_trace(signal: &[f32], positions: usize, safe: Option<&[u8]>) -> Result<usize, String> {
    if positions == 0 {
        return Err("replay: the trace has no positions".to_string());
    }
    if signal.len() % positions != 0 {
        return Err(format!(
            "replay: signal of {} values does not split into rows of {positions}",
            signal.len()
        ));
    }
    if let Some(s) = safe {
        if s.len() != signal.len() {
            return Err(format!(
                "replay: safe labels have {} values, signal has {}",
                s.len(),
                signal.len()
            ));
        }
    }
    Ok(signal.len() / positions)
}

fn run_chunks<F>(tokens: usize, configs: usize, per_chunk: F) -> Vec<Counts>
where
    F: Fn(std::ops::Range<usize>, &mut [Counts]) + Sync,
{
    let chunks = tokens.div_ceil(CHUNK_TOKENS);
    (0..chunks)
        .into_par_iter()
        .fold(
            || vec![Counts::default(); configs],
            |mut acc, ch| {
                let start = ch * CHUNK_TOKENS;
                per_chunk(start..(start + CHUNK_TOKENS).min(tokens), &mut acc);
                acc
            },
        )
        .reduce(
            || vec![Counts::default(); configs],
            |mut a, b| {
                for (x, y) in a.iter_mut().zip(b) {
                    *x += y;
                }
                a
            },
        )
}

/// Replay V7 configurations over a `[tokens, num_layers]` similarity trace.
pub fn replay_monitor(
    sim: &[f32],
    num_layers: usize,
    safe: Option<&[u8]>,
    configs: &[MonitorConfig],
) -> Result<Vec<Counts>, String> {
    let tokens = check_trace(sim, num_layers, safe)?;
    if configs.iter().any(|c| c.k == 0) {
        return Err("replay: k must be >= 1".to_string());
    }
    Ok(run_chunks(tokens, configs.len(), |range, acc| {
        for (cfg, out) in configs.iter().zip(acc.iter_mut()) {
            for t in range.clone() {
                let row = &sim[t * num_layers..(t + 1) * num_layers];
                if cfg.per_layer {
                    let end = num_layers.saturating_sub(cfg.protect_last);
                    let mut run = 0usize;
                    let mut skipped = 0i64;
                    for (j, &s) in row.iter().enumerate().take(end) {
                        if run >= cfg.k {
                            skipped += 1;
                        }
                        if j >= cfg.min_layer && s >= cfg.tau {
                            run += 1;
                        } else {
                            run = 0;
                        }
                    }
                    // Per-layer skips are not a cascade: the labels do not apply.
                    record(out, skipped, None);
                } else {
                    let l = consecutive_token(row, cfg.tau, cfg.k, cfg.min_layer);
                    if l >= 0 {
                        let l = l as usize;
                        let label = safe.map(|s| s[t * num_layers + l]);
                        record(out, skipped_after(l, num_layers, cfg.protect_last), label);
                    }
                }
            }
        }
    }))
}

/// Replay probe configurations over a `[tokens, checkpoints]` risk trace;
/// `layer_of[i]` is the decoder layer after which checkpoint `i` is read.
pub fn replay_probe(
    risk: &[f32],
    layer_of: &[usize],
    num_layers: usize,
    safe: Option<&[u8]>,
    configs: &[ProbeConfig],
) -> Result<Vec<Counts>, String> {
    let c = layer_of.len();
    let tokens = check_trace(risk, c, safe)?;
    if let Some(bad) = configs.iter().position(|p| p.params.checkpoints() != c) {
        return Err(format!(
            "replay: config {bad} has {} checkpoints, the trace has {c}",
            configs[bad].params.checkpoints()
        ));
    }
    Ok(run_chunks(tokens, configs.len(), |range, acc| {
        for (cfg, out) in configs.iter().zip(acc.iter_mut()) {
            for t in range.clone() {
                let row = &risk[t * c..(t + 1) * c];
                let e = cfg.params.decide(row, |_, _| {});
                if e >= 0 {
                    let e = e as usize;
                    let label = safe.map(|s| s[t * c + e]);
                    record(
                        out,
                        skipped_after(layer_of[e], num_layers, cfg.protect_last),
                        label,
                    );
                }
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decide::Rule;

    #[test]
    fn monitor_cascade_counts() {
        // 2 tokens x 4 layers
        let sim = [0.99, 0.99, 0.1, 0.1, /* */ 0.1, 0.99, 0.99, 0.99];
        let safe = [1, 0, 1, 1, /* */ 1, 1, 0, 1];
        let cfg = MonitorConfig {
            tau: 0.98,
            k: 2,
            min_layer: 0,
            protect_last: 0,
            per_layer: false,
        };
        let out = replay_monitor(&sim, 4, Some(&safe), &[cfg]).unwrap();
        // token 0 exits after layer 1: skips layers 2,3 (unsafe label at 1)
        // token 1 exits after layer 2: skips layer 3 (unsafe label at 2)
        assert_eq!(
            out[0],
            Counts {
                exits: 2,
                skipped_layers: 3,
                unsafe_exits: 2
            }
        );
        // protecting the last layer: token 1 skips nothing and does not count
        let cfg = MonitorConfig {
            protect_last: 1,
            ..cfg
        };
        let out = replay_monitor(&sim, 4, Some(&safe), &[cfg]).unwrap();
        assert_eq!(
            out[0],
            Counts {
                exits: 1,
                skipped_layers: 1,
                unsafe_exits: 1
            }
        );
    }

    #[test]
    fn monitor_per_layer_counts() {
        let sim = [0.99, 0.99, 0.1, 0.99, 0.99, 0.99];
        let cfg = MonitorConfig {
            tau: 0.98,
            k: 1,
            min_layer: 0,
            protect_last: 0,
            per_layer: true,
        };
        // skip j when S_{j-1} >= tau: j = 1, 2, 4, 5
        let out = replay_monitor(&sim, 6, None, &[cfg]).unwrap();
        assert_eq!(
            out[0],
            Counts {
                exits: 1,
                skipped_layers: 4,
                unsafe_exits: 0
            }
        );
    }

    #[test]
    fn many_chunks_sum_exactly() {
        let layers = 5;
        let tokens = CHUNK_TOKENS * 3 + 11;
        let sim: Vec<f32> = (0..tokens * layers)
            .map(|i| ((i * 31) % 100) as f32 / 100.0)
            .collect();
        let cfg = MonitorConfig {
            tau: 0.5,
            k: 2,
            min_layer: 1,
            protect_last: 1,
            per_layer: false,
        };
        let got = replay_monitor(&sim, layers, None, &[cfg]).unwrap()[0];
        let mut want = Counts::default();
        for t in 0..tokens {
            let l = consecutive_token(&sim[t * layers..(t + 1) * layers], 0.5, 2, 1);
            if l >= 0 {
                record(&mut want, skipped_after(l as usize, layers, 1), None);
            }
        }
        assert_eq!(got, want);
    }

    #[test]
    fn probe_counts_and_shape_errors() {
        let risk = [0.5, 2.0, 2.0, /* */ 2.0, 2.0, 0.1];
        let safe = [0, 1, 1, /* */ 1, 1, 1];
        let (thr, tgt, w) = ([1.0f32; 3], [0.5f32; 3], [1.0f32; 3]);
        let params = ProbeParams {
            thresholds: &thr,
            targets: &tgt,
            weights: &w,
            decay: 0.9,
            rule: Rule::Threshold,
            adaptive: None,
        };
        let cfg = ProbeConfig {
            params,
            protect_last: 0,
        };
        let out = replay_probe(&risk, &[1, 3, 5], 8, Some(&safe), &[cfg]).unwrap();
        // token 0 exits after layer 1 (skips 6, unsafe); token 1 after layer 5 (skips 2)
        assert_eq!(
            out[0],
            Counts {
                exits: 2,
                skipped_layers: 8,
                unsafe_exits: 1
            }
        );
        assert!(replay_probe(&risk, &[1, 3], 8, None, &[cfg]).is_err());
    }
}
