//! `verify` refuses each kind of broken program, and the readers refuse
//! other format versions. The starting point is a small valid program
//! (1F1B, p = 2, m = 2) written in the text form.

use stp_ir::{load_json, parse_text, print_text, to_json, verify, Buffer, Instr, Microbatch, Program, Rank, Stage};

/// 1F1B at p = 2, m = 2, every transfer posted on its own.
const VALID: &str = include_str!("programs/one_f_one_b_p2_m2.txt");
fn valid() -> Program {
    parse_text(VALID).expect("the valid program parses")
}

fn errors_of(program: &Program) -> Vec<String> {
    match verify(program) {
        Ok(()) => Vec::new(),
        Err(errors) => errors.iter().map(ToString::to_string).collect(),
    }
}

fn assert_refused(program: &Program, needle: &str) {
    let errors = errors_of(program);
    assert!(errors.iter().any(|e| e.contains(needle)), "expected an error containing {needle:?}, got {errors:#?}");
}

#[test]
fn the_valid_program_verifies_and_round_trips() {
    let program = valid();
    assert_eq!(errors_of(&program), Vec::<String>::new());
    assert_eq!(print_text(&program), VALID);
    assert_eq!(load_json(&to_json(&program)).ok(), Some(program));
}

#[test]
fn receives_in_the_wrong_order_are_refused() {
    let mut program = valid();
    // r1 receives mb1's activation first although r0 sends mb0's first.
    let instrs = &mut program.ranks[1].instrs;
    instrs.swap(0, 8);
    assert_refused(&program, "must be posted in the same order");
}

#[test]
fn a_send_without_a_receive_is_refused() {
    let mut program = valid();
    program.ranks[1].instrs.remove(8); // recv act.s0.mb1
    assert_refused(&program, "send of act.s0.mb1 has no matching receive on r1");
}

#[test]
fn a_use_after_free_is_refused() {
    let mut program = valid();
    // Free mb0's stash on r0 right after its forward.
    let free = program.ranks[0].instrs.remove(9);
    program.ranks[0].instrs.insert(1, free);
    assert_refused(&program, "reads stash.s0.mb0, which is already freed");
}

#[test]
fn double_frees_and_leaks_are_refused() {
    let mut program = valid();
    let free = program.ranks[0].instrs[2].clone();
    program.ranks[0].instrs.push(free);
    assert_refused(&program, "act.s0.mb0 is freed twice");
    let mut leaky = valid();
    leaky.ranks[1].instrs.pop();
    assert_refused(&leaky, "grad.s1.mb1 is never freed");
}

#[test]
fn a_pass_on_a_rank_that_does_not_own_its_stage_is_refused() {
    let mut program = valid();
    program.schedule.placement[1] = Rank(0);
    assert_refused(&program, "is owned by r0");
}

#[test]
fn ids_out_of_range_are_refused() {
    let mut program = valid();
    program.ranks[0].instrs.push(Instr::Free { buffer: Buffer::act(Stage(7), Microbatch(0)) });
    assert_refused(&program, "out of range");
    let mut program = valid();
    program.ranks[0].instrs[1] = Instr::send(Buffer::act(Stage(0), Microbatch(0)), Rank(5));
    assert_refused(&program, "not another rank");
}

#[test]
fn a_transfer_to_the_wrong_rank_is_refused() {
    let text = VALID.replace("place r0 r1", "place r0 r1\n").replace("ranks 2", "ranks 3");
    let mut program = parse_text(&text).expect("parses");
    program.ranks.push(stp_ir::RankProgram { rank: Rank(2), instrs: Vec::new() });
    program.ranks[0].instrs[1] = Instr::send(Buffer::act(Stage(0), Microbatch(0)), Rank(2));
    assert_refused(&program, "travels from r0 to r1, not from r0 to r2");
}

#[test]
fn groups_print_parse_and_match_in_posting_order() {
    let grouped = VALID.replace(
        "  send act.s0.mb1 -> r1\n  free act.s0.mb1\n  recv grad.s1.mb0 <- r1\n",
        "  group {\n    send act.s0.mb1 -> r1\n    recv grad.s1.mb0 <- r1\n  }\n  free act.s0.mb1\n",
    );
    assert_ne!(grouped, VALID);
    let program = parse_text(&grouped).expect("grouped program parses");
    assert_eq!(print_text(&program), grouped);
    assert_eq!(errors_of(&program), Vec::<String>::new());
    assert_eq!(load_json(&to_json(&program)).ok(), Some(program));
    let empty = VALID.replace("  send act.s0.mb1 -> r1\n", "  group {\n  }\n");
    assert!(parse_text(&empty).expect_err("empty group").message.contains("at least one transfer"));
}

#[test]
fn other_format_versions_are_refused() {
    let text = VALID.replace("stp-ir 1", "stp-ir 2");
    let err = parse_text(&text).expect_err("version 2 must be refused");
    assert!(err.to_string().contains("understands only version 1"), "{err}");
    let json = to_json(&valid()).replacen("\"version\":1", "\"version\":3", 1);
    let err = load_json(&json).expect_err("version 3 must be refused");
    assert!(err.to_string().contains("understands only versions 1 and 2 (compact)"), "{err}");
    // Version 2 is the compact form: a version-1 body under its number is not one.
    let json = to_json(&valid()).replacen("\"version\":1", "\"version\":2", 1);
    let err = load_json(&json).expect_err("a version-1 body is no compact program");
    assert!(err.to_string().contains("not a valid compact stp-ir program"), "{err}");
    assert!(load_json("{}").expect_err("no version").to_string().contains("no `version`"));
}

#[test]
fn malformed_text_names_the_line() {
    let text = VALID.replace("  BW s0 mb0", "  BX s0 mb0");
    let err = parse_text(&text).expect_err("unknown pass kind");
    assert_eq!(err.line, 18);
    assert!(err.message.contains("unknown pass kind `BX`"), "{err}");
    let unclosed = VALID.trim_end().trim_end_matches('}');
    assert!(parse_text(unclosed).expect_err("unclosed rank").message.contains("not closed"));
}

#[test]
fn tensor_parallel_units_follow_the_canonical_order() {
    let mut program = valid();
    program.schedule.tp = 2;
    assert_refused(&program, "with tensor parallelism (tp = 2) a compute lists its units");
    for rank in &mut program.ranks {
        for instr in &mut rank.instrs {
            if let Instr::Compute(c) = instr {
                c.units = c.canonical_units();
            }
        }
    }
    assert_eq!(errors_of(&program), Vec::<String>::new());
    assert_eq!(parse_text(&print_text(&program)).ok().as_ref(), Some(&program));
    assert_eq!(load_json(&to_json(&program)).ok().as_ref(), Some(&program));
    // The MLP may not run before the attention of the same forward.
    if let Instr::Compute(c) = &mut program.ranks[0].instrs[0] {
        c.units.swap(0, 1);
    }
    assert_refused(&program, "must be attn, mlp in that order");
    // Units without tensor parallelism are refused too.
    let mut plain = valid();
    if let Instr::Compute(c) = &mut plain.ranks[0].instrs[0] {
        c.units = c.canonical_units();
    }
    assert_refused(&plain, "units listed, but the program has no tensor parallelism");
}

/// Rank 0's `BW s0 mb0` (instruction 7) replaced by the given computes.
fn split_first_backward(program: &mut Program, computes: Vec<Vec<stp_ir::PassKind>>) {
    let pass = |kind| stp_ir::Pass { kind, stage: Stage(0), mb: Microbatch(0) };
    let instrs = &mut program.ranks[0].instrs;
    assert_eq!(instrs[7].to_string(), "BW s0 mb0");
    let new: Vec<Instr> = computes
        .into_iter()
        .map(|kinds| Instr::Compute(stp_ir::Compute { passes: kinds.into_iter().map(pass).collect(), units: vec![] }))
        .collect();
    instrs.splice(7..8, new);
}

#[test]
fn a_weight_gradient_before_its_input_gradient_is_refused() {
    use stp_ir::PassKind::{B, W};
    let mut program = valid();
    split_first_backward(&mut program, vec![vec![B], vec![W]]);
    assert_eq!(errors_of(&program), Vec::<String>::new(), "B then W is fine");
    let mut program = valid();
    split_first_backward(&mut program, vec![vec![W], vec![B]]);
    assert_refused(&program, "`W s0 mb0` runs before `B s0 mb0` has finished");
}

#[test]
fn a_braid_of_one_stage_and_microbatch_is_refused() {
    use stp_ir::PassKind::{B, W};
    let mut program = valid();
    split_first_backward(&mut program, vec![vec![B, W]]);
    assert_refused(&program, "braids two passes of s0 mb0");
}
