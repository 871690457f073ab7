//! The untimed simulator: deadlocks under rendezvous and buffered sends,
//! and the receive hoisting that removes the ones regrouping can remove.

use stp_ir::simulate::{find_deadlock, hoist_receives, Semantics, Wait};
use stp_ir::{parse_text, verify, Direction, Program};

/// 1F1B, p = 2, m = 2, every transfer posted on its own.
const UNGROUPED: &str = include_str!("programs/one_f_one_b_p2_m2.txt");
fn program(text: &str) -> Program {
    let p = parse_text(text).expect("parses");
    verify(&p).expect("verifies");
    p
}

#[test]
fn sends_that_wait_for_each_other_deadlock_only_under_rendezvous() {
    let p = program(UNGROUPED);
    assert_eq!(find_deadlock(&p, Semantics::Buffered), Ok(()));
    let deadlock = find_deadlock(&p, Semantics::Rendezvous).expect_err("the classic 1F1B send/send deadlock");
    let blocked: Vec<(u32, usize, String)> = deadlock
        .blocked
        .iter()
        .map(|b| (b.rank.0, b.instr, b.pending.iter().map(|p| p.transfer.to_string()).collect::<Vec<_>>().join(",")))
        .collect();
    assert_eq!(blocked, [(0, 4, "send act.s0.mb1 -> r1".to_string()), (1, 6, "send grad.s1.mb0 -> r0".to_string())]);
    assert!(deadlock.blocked.iter().all(|b| b.pending.iter().all(|p| p.wait == Wait::PeerNotPosted)));
}

#[test]
fn grouping_the_send_with_the_next_receive_removes_the_deadlock() {
    let grouped = UNGROUPED
        .replace(
            "  send act.s0.mb1 -> r1\n  free act.s0.mb1\n  recv grad.s1.mb0 <- r1\n",
            "  group {\n    send act.s0.mb1 -> r1\n    recv grad.s1.mb0 <- r1\n  }\n  free act.s0.mb1\n",
        )
        .replace(
            "  send grad.s1.mb0 -> r0\n  free grad.s1.mb0\n  recv act.s0.mb1 <- r0\n",
            "  group {\n    send grad.s1.mb0 -> r0\n    recv act.s0.mb1 <- r0\n  }\n  free grad.s1.mb0\n",
        );
    let p = program(&grouped);
    assert_eq!(find_deadlock(&p, Semantics::Rendezvous), Ok(()));
}

#[test]
fn hoisting_moves_the_receive_the_blocked_sender_needs() {
    let mut p = program(UNGROUPED);
    assert_eq!(hoist_receives(&mut p), Ok(1));
    verify(&p).expect("hoisted program verifies");
    assert_eq!(find_deadlock(&p, Semantics::Rendezvous), Ok(()));
    // r1 now posts the receive of mb1's activation together with its send.
    let group = p.ranks[1].instrs.iter().find(|i| i.transfers().len() == 2).expect("a group on r1");
    let dirs: Vec<Direction> = group.transfers().iter().map(|t| t.dir).collect();
    assert_eq!(dirs, [Direction::Send, Direction::Recv]);
    assert_eq!(group.transfers()[1].buffer.to_string(), "act.s0.mb1");
}

#[test]
fn a_cycle_of_data_dependencies_cannot_be_hoisted_away() {
    // r0 waits for mb0's gradient before sending mb0's activation.
    let cyclic = UNGROUPED.replace(
        "  F s0 mb0\n  send act.s0.mb0 -> r1\n",
        "  F s0 mb0\n  recv grad.s1.mb0 <- r1\n  send act.s0.mb0 -> r1\n",
    );
    let cyclic = cyclic.replacen("  recv grad.s1.mb0 <- r1\n  BW s0 mb0\n", "  BW s0 mb0\n", 1);
    let mut p = parse_text(&cyclic).expect("parses");
    assert!(find_deadlock(&p, Semantics::Buffered).is_err());
    let deadlock = hoist_receives(&mut p).expect_err("no regrouping fixes a dependency cycle");
    assert_eq!(deadlock.blocked.len(), 2);
}
