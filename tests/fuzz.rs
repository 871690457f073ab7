//! A slice of the fuzz campaign (`cargo run --release -p stp-fuzz --
//! --cases N`; the book's testing chapter records a million cases): every
//! family of hostile and random input, judged by the same oracles. Any
//! panic, or anything stp accepts and then fails to run, fails the test.
//! Time is reported by the campaign, never judged here.

use std::time::Duration;
use stp_fuzz::campaign::{run_case, Tally};

#[test]
fn a_slice_of_the_campaign_finds_no_panic_and_no_disagreement() {
    let mut tally = Tally::default();
    // A different seed from the recorded campaign's, so CI covers new cases.
    for index in 0..3_000 {
        tally.add(index, run_case(7, index), Duration::MAX);
    }
    assert_eq!(tally.broken(), 0, "{}\n{:#?}", tally.table(), tally.failures);
    // The oracles saw real programs, not only refusals.
    let accepted: u64 = tally.rows.values().map(|r| r[0]).sum();
    assert!(accepted >= 500, "{}", tally.table());
}
