//! PyTorch pipelining's schedule CSV, both ways: what stpc exports,
//! stpc imports back into the same compute order, and it checks; a CSV
//! that cannot be read says where.

use stp_ir::Instr;
use stpc::emit::torch::{import_torch_csv, torch_csv};
use stpc::pipeline::{build, Request};
use stpc::syntax::span::SourceFile;

/// Per rank, its passes in order, braids unfolded (a braid lists its
/// forward first).
fn pass_order(program: &stp_ir::Program) -> Vec<Vec<stp_ir::Pass>> {
    program.ranks.iter().map(|r| r.instrs.iter().flat_map(|i| i.passes().iter().copied()).collect()).collect()
}

fn compute_order(program: &stp_ir::Program) -> Vec<Vec<String>> {
    program
        .ranks
        .iter()
        .map(|r| {
            r.instrs
                .iter()
                .filter_map(|i| match i {
                    Instr::Compute(c) => Some(format!("{:?}", c.passes)),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

#[test]
fn exported_schedules_import_to_the_same_order_and_check() {
    for (name, p, m, v) in [
        ("gpipe", 4, 8, None),
        ("1f1b", 4, 8, None),
        ("zb-h1", 4, 8, None),
        ("zb-h2", 4, 8, None),
        ("zb-v", 4, 8, None),
        ("dualpipe-v", 4, 8, None),
        ("interleaved-1f1b", 4, 8, Some(2)),
    ] {
        let original = stp_tests::build_std(name, p, m, v);
        for comms in [false, true] {
            let csv = torch_csv(&original.program, comms);
            let imported = import_torch_csv(&csv.text, "imported").unwrap_or_else(|e| panic!("{name}: {e}"));
            let file = SourceFile::new("imported.sched", imported.source.as_str());
            let request = Request {
                params: stpc::elab::ParamArgs {
                    ranks: Some(imported.ranks),
                    microbatches: Some(imported.microbatches),
                    ..Default::default()
                },
                ..Default::default()
            };
            let back = build(&file, &request).unwrap_or_else(|d| panic!("{name} imported does not check: {d:?}"));
            if comms {
                // The compute_comms form writes a braid as its two actions,
                // forward first: the same passes in the same order.
                assert_eq!(pass_order(&back.program), pass_order(&original.program), "{name} comms={comms}");
            } else {
                assert_eq!(compute_order(&back.program), compute_order(&original.program), "{name} comms={comms}");
            }
        }
    }
}

#[test]
fn a_csv_stpc_cannot_read_is_reported_at_its_cell() {
    let e = import_torch_csv("0F0,0F1\n1F0,1X0\n", "s").expect_err("1X0 is no action");
    assert_eq!((e.line, e.cell, e.text.as_str()), (2, 2, "1X0"));
    let e = import_torch_csv("0F0\n0F1\n", "s").expect_err("stage 0 on two ranks");
    assert_eq!(e.line, 2);
    assert!(e.message.contains("also runs on rank 0"), "{e}");
}

/// A hand-written PyTorch-style CSV with a mistake: rank 1 runs the
/// backward of microbatch 0 before its forward. stpc refuses it.
#[test]
fn an_imported_order_that_cannot_run_is_refused() {
    let csv = "0F0,0F1,0B0,0B1\n1B0,1F0,1F1,1B1\n";
    let imported = import_torch_csv(csv, "broken").expect("the CSV parses");
    let file = SourceFile::new("broken.sched", imported.source.as_str());
    let request = Request {
        params: stpc::elab::ParamArgs { ranks: Some(2), microbatches: Some(2), ..Default::default() },
        ..Default::default()
    };
    let errors = build(&file, &request).expect_err("BW of mb 0 before its forward");
    assert!(
        errors.iter().any(|d| matches!(d.code, stpc::diag::Code::LocalOrder | stpc::diag::Code::DependencyCycle)),
        "{errors:?}"
    );
}

/// A hand-written CSV in PyTorch's compute_comms form, with FSDP actions
/// and a braided `OVERLAP_F_B`: rank 0 overlaps the forward of
/// microbatch 2 with the full backward of microbatch 0. stpc reads the
/// compute order, leaves out transfers and FSDP actions (saying how many)
/// and checks the result.
#[test]
fn a_hand_written_csv_with_fsdp_actions_and_an_overlap_imports_and_checks() {
    let csv = "0UNSHARD,0F0,0SEND_F0,0F1,0SEND_F1,0RECV_B0,(0F2;0B0)OVERLAP_F_B,0SEND_F2,0RECV_B1,0B1,0RECV_B2,0B2,0RESHARD,0REDUCE_GRAD\n\
               1UNSHARD,1RECV_F0,1F0,1B0,1SEND_B0,1RECV_F1,1F1,1B1,1SEND_B1,1RECV_F2,1F2,1B2,1SEND_B2,1RESHARD,1REDUCE_GRAD\n";
    let imported = import_torch_csv(csv, "hand").expect("the CSV parses");
    assert_eq!(imported.skipped, vec![("REDUCE_GRAD", 2), ("RESHARD", 2), ("UNSHARD", 2)]);
    assert!(imported.source.contains("F(2, 0) & BW(0, 0)"), "{}", imported.source);
    let file = SourceFile::new("hand.sched", imported.source.as_str());
    let request = Request {
        params: stpc::elab::ParamArgs { ranks: Some(2), microbatches: Some(3), ..Default::default() },
        ..Default::default()
    };
    let built = build(&file, &request).unwrap_or_else(|d| panic!("the hand-written CSV checks: {d:?}"));
    // Rank 0 runs F0, F1, the braid, BW1, BW2: five compute ops.
    let computes = built.program.ranks[0].instrs.iter().filter(|i| matches!(i, stp_ir::Instr::Compute(_))).count();
    assert_eq!(computes, 5);
    // A misspelled FSDP action is still an error, not silently dropped.
    let e = import_torch_csv("0F0,0UNSHARDED\n", "s").expect_err("0UNSHARDED is no action");
    assert_eq!(e.cell, 2);
}
