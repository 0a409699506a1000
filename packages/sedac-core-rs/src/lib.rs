//! SEDAC decision math.
//!
//! The algorithms live in plain functions over slices ([`decide`], [`replay`]) so
//! they can be tested with `cargo test` and reused without Python. The optional
//! `python` feature adds a thin pyo3 layer (`sedac_core._native`) that only checks
//! buffers, releases the GIL and calls these functions.
//!
//! Every function here has a numpy twin in `python/sedac_core/_numpy.py` that must
//! produce the same decisions on the same inputs; the float operations are written
//! in the same order on both sides (no fused multiply-add, f32 throughout, quantiles
//! interpolated in f64) so that this holds bit for bit for the decisions.
//! [`channel`]'s MLP is arithmetic, not a decision: its twin is the masked dense
//! MLP, equal up to float rounding (a GEMM sums in another order).

pub mod channel;
pub mod decide;
pub mod replay;

#[cfg(feature = "python")]
mod py;
