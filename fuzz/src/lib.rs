//! # stp-fuzz: hostile and random input for every stp front door
//!
//! Generators ([`valid`] for random valid schedules, [`mutate`] for
//! mutants of sources, programs and CSVs) and the oracles that judge them
//! ([`oracle`]): a case may be refused with a diagnostic, but never crash,
//! hang or be accepted and then fail to run. Everything is driven by a
//! seed ([`rng::Rng`]), so a case is reproduced by its number.

pub mod campaign;
pub mod mutate;
pub mod oracle;
pub mod rng;
pub mod valid;
