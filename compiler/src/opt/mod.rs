//! Deciding what a schedule leaves open. Today: a greedy list scheduler
//! that orders every pass of an `auto` schedule ([`greedy`]), and the
//! lower bound a schedule's makespan cannot beat ([`bound`]). Whatever
//! these produce goes through the checker, lowering and the simulator like
//! a hand-written schedule: their answers are never trusted unchecked.

pub mod bound;
pub mod greedy;
