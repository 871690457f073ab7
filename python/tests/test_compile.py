"""The `stp` package against what the compiler promises: programs that
run every pass once on its owner, the published formulas, errors that
say what and where, and programs that survive their JSON form."""

import json
import os
import tempfile
import unittest
from collections import Counter

import stp
from stp import Compute, Free, Group, Reduce

MISSING_DRAIN = """\
/// 1F1B without its drain.
schedule no_drain(p: ranks, m: microbatches) {
  stages p;
  place s -> s;
  rank r {
    let w = min(p - 1 - r, m);
    for i in 0..w { F(i) }
    for i in 0..m - w { F(i + w); BW(i) }
  }
}
"""


def passes_by_kind(program):
    """(kind, stage, microbatch) -> how many times it runs, and on which ranks."""
    seen = Counter()
    where = {}
    for rank in program.ranks:
        for p in rank.passes():
            seen[(p.kind, p.stage, p.microbatch)] += 1
            where[(p.kind, p.stage, p.microbatch)] = rank.rank
    return seen, where


class CompileTest(unittest.TestCase):
    def test_every_standard_schedule_runs_each_pass_once_on_its_owner(self):
        chunked = ("interleaved-1f1b", "interleaved-1f1b-recompute", "interleaved-zb", "looped-bfs")
        sizes = {name: {"v": 2} for name in chunked}
        for name in stp.standard_schedules():
            with self.subTest(schedule=name):
                program = stp.compile(name, p=4, m=12, **sizes.get(name, {}))
                seen, where = passes_by_kind(program)
                for stage in range(program.num_stages):
                    pipeline = stage // (program.num_stages // program.pipelines)
                    for mb in range(program.num_microbatches):
                        if program.pipelines > 1 and program.routes[mb] != pipeline:
                            self.assertNotIn(("F", stage, mb), seen)
                            continue
                        self.assertEqual(seen[("F", stage, mb)], 1, (stage, mb))
                        full, split = seen[("BW", stage, mb)], (seen[("B", stage, mb)], seen[("W", stage, mb)])
                        self.assertTrue(full == 1 and split == (0, 0) or full == 0 and split == (1, 1), (stage, mb))
                for (kind, stage, mb), rank in where.items():
                    self.assertEqual(rank, program.owner(stage), (kind, stage, mb))

    def test_one_f_one_b_takes_the_published_makespan(self):
        # (m + p - 1)(T_F + T_B + T_W) at unit costs.
        for p, m in [(2, 4), (4, 8), (8, 16)]:
            timeline = stp.simulate("1f1b", p=p, m=m)
            self.assertAlmostEqual(timeline.makespan, 3 * (m + p - 1))
            self.assertAlmostEqual(timeline.bubble_ratio, (p - 1) / (m + p - 1))
            self.assertEqual(len(timeline.ranks), p)

    def test_zb_h1_bubble_is_the_paper_formula_under_any_costs(self):
        cost = {"forward": 1.0, "backward_input": 2.0, "backward_weight": 0.5}
        p, m = 4, 12
        timeline = stp.simulate("zb-h1", p=p, m=m, cost=cost)
        work = m * 3.5
        self.assertAlmostEqual(timeline.makespan, work + (p - 1) * (1.0 + 2.0 - 0.5))

    def test_per_stage_costs_from_a_dict(self):
        # tests/golden.rs derives 80.9 for these costs (first stage 1.3x, last 2.5x).
        def stage(f):
            return {"forward": f, "backward_input": 2 * f, "backward_weight": 1, "tp_collective": 0}

        cost = {"stages": [stage(1.3), stage(1.0), stage(1.0), stage(2.5)]}
        self.assertAlmostEqual(stp.simulate("1f1b", p=4, m=8, cost=cost).makespan, 80.9)
        # DualPipe takes the same per-part times for both its model copies.
        self.assertAlmostEqual(stp.simulate("dualpipe", p=4, m=8, cost=cost).makespan, 54.0)

    def test_a_program_survives_its_json_form(self):
        program = stp.compile("stp", p=4, m=12, tp=2)
        again = stp.Program.from_json(program.to_json())
        self.assertEqual(again, program)
        self.assertEqual(json.loads(again.to_json())["schedule"]["tp"], 2)
        compute = next(i for i in program.ranks[0].instructions if isinstance(i, Compute))
        self.assertTrue(compute.units, "with tp = 2 every compute lists its units")
        self.assertTrue(any(i.braided for r in program.ranks for i in r.instructions if isinstance(i, Compute)))

    def test_the_compact_form_reads_back_to_the_same_program(self):
        program = stp.compile("zb-v", p=4, m=8)
        compact = program.to_json(compact=True)
        self.assertTrue(compact.startswith('{"version":2,'), compact[:40])
        self.assertLess(3 * len(compact), len(program.to_json()))
        self.assertEqual(stp.Program.from_json(compact), program)

    def test_transfers_pair_up_on_every_link(self):
        program = stp.compile("zb-v", p=4, m=8)
        sends, recvs = Counter(), Counter()
        for rank in program.ranks:
            for group in (i for i in rank.instructions if isinstance(i, Group)):
                for t in group.transfers:
                    (sends if t.direction == "send" else recvs)[(rank.rank, t.peer, str(t.buffer)) if t.direction == "send" else (t.peer, rank.rank, str(t.buffer))] += 1
        self.assertEqual(sends, recvs)
        self.assertTrue(sends)

    def test_every_buffer_is_freed_once(self):
        program = stp.compile("interleaved-1f1b", p=2, m=4, v=2)
        for rank in program.ranks:
            freed = Counter(str(i.buffer) for i in rank.instructions if isinstance(i, Free))
            self.assertTrue(all(n == 1 for n in freed.values()))

    def test_several_pipelines_carry_routes_and_reductions(self):
        program = stp.compile("dualpipe", p=4, m=8)
        self.assertEqual(program.pipelines, 2)
        self.assertEqual(program.routes, (0, 0, 0, 0, 1, 1, 1, 1))
        for rank in program.ranks:
            reductions = [i for i in rank.instructions if isinstance(i, Reduce)]
            self.assertEqual(len(reductions), 2, "one per part the rank holds a copy of")
            self.assertIsInstance(rank.instructions[-1], Reduce)

    def test_auto_schedules_are_ordered_for_the_given_costs(self):
        source = """
        schedule v_auto(p: ranks, m: microbatches) {
          stages 2 * p;
          place s -> if s < p { s } else { 2 * p - 1 - s };
          memory { budget = 2 * p; }
          auto;
        }"""
        cost = {"forward": 1, "backward_input": 2, "backward_weight": 0.5}
        program = stp.compile(source, p=2, m=4, cost=cost)
        self.assertIsNotNone(program.plan)
        self.assertEqual(program.cost["backward_input"], 2)
        timeline = stp.simulate(program)
        self.assertGreaterEqual(timeline.makespan + 1e-9, program.lower_bound)
        self.assertTrue(all(peak <= 4 for peak in program.peaks))

    def test_a_file_path_and_several_schedules(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "two.sched")
            with open(path, "w") as f:
                f.write(MISSING_DRAIN.replace("no_drain", "a") + MISSING_DRAIN.replace("no_drain", "b"))
            with self.assertRaises(stp.CompileError) as caught:
                stp.compile(path, p=2, m=2)
            self.assertEqual(caught.exception.code, "E0010")
            self.assertIn("`a`, `b`", caught.exception.report)
            with self.assertRaises(stp.CompileError) as caught:
                stp.compile(path, p=2, m=2, schedule_name="b")
            self.assertEqual(caught.exception.file, path)
            self.assertEqual(caught.exception.code, "E0018")


class TorchCsvTest(unittest.TestCase):
    def test_the_compute_only_form_is_the_books_example(self):
        csv = stp.torch_csv(stp.compile("1f1b", p=2, m=2))
        self.assertEqual(csv.text, "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n")
        self.assertEqual(csv.notes, ())

    def test_with_transfers_braids_are_split_and_a_note_says_so(self):
        program = stp.compile("stp", p=2, m=6)
        only = stp.torch_csv(program).text
        comms = stp.torch_csv(program, comms=True)
        self.assertIn("OVERLAP_F_B", only)
        self.assertNotIn("OVERLAP_F_B", comms.text)
        self.assertIn("SEND_F", comms.text)
        self.assertTrue(any("written as their two actions" in n for n in comms.notes), comms.notes)
        # every compute action of the compute-only form, in the same order
        split = [a for row in only.splitlines() for c in row.split(",") for a in c.strip("()").replace(")OVERLAP_F_B", "").split(";")]
        computes = [c for row in comms.text.splitlines() for c in row.split(",") if "SEND" not in c and "RECV" not in c]
        self.assertEqual(split, computes)

    def test_several_pipelines_are_refused(self):
        with self.assertRaisesRegex(stp.StpError, "runs 2 pipelines"):
            stp.torch_csv(stp.compile("dualpipe", p=2, m=4))

    def test_write_replaces_the_file_whole(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "s.csv")
            stp.torch_csv(stp.compile("1f1b", p=2, m=2)).write(path)
            with open(path) as f:
                self.assertEqual(f.read(), "0F0,0F1,0B0,0B1\n1F0,1B0,1F1,1B1\n")
            self.assertEqual(os.listdir(d), ["s.csv"])


class ThreadTest(unittest.TestCase):
    def test_threads_compile_side_by_side_to_the_same_programs(self):
        # The compiler releases the interpreter while it works; results
        # do not depend on which thread asked, nor on the others.
        from concurrent.futures import ThreadPoolExecutor

        names = ["1f1b", "zb-h1", "zb-v", "stp", "dualpipe", "chimera"] * 2
        alone = {name: stp.compile(name, p=4, m=12).to_json() for name in set(names)}
        with ThreadPoolExecutor(max_workers=4) as pool:
            together = list(pool.map(lambda name: stp.compile(name, p=4, m=12).to_json(), names))
        self.assertEqual(together, [alone[name] for name in names])


class ErrorTest(unittest.TestCase):
    def test_a_missing_drain_names_the_code_the_line_and_every_missing_pass(self):
        with self.assertRaises(stp.CompileError) as caught:
            stp.compile(MISSING_DRAIN, p=4, m=8)
        e = caught.exception
        self.assertEqual(e.code, "E0018")
        self.assertEqual(e.line, 5, "the rank body")
        self.assertIn("never run", e.message)
        self.assertIn("missing by rank", e.report)
        self.assertIn("<string>:5:", e.report)
        self.assertEqual(str(e), e.report)
        self.assertIsInstance(e, stp.StpError)

    def test_a_syntax_error_points_at_its_column(self):
        with self.assertRaises(stp.CompileError) as caught:
            stp.compile("schedule s(p: ranks, m: microbatches) {\n  stages p\n  place s -> ;\n}", p=2, m=2)
        e = caught.exception
        self.assertEqual(e.code, "E0001")
        self.assertEqual((e.line, e.column), (3, 14))

    def test_a_failing_require_shows_the_values(self):
        with self.assertRaises(stp.CompileError) as caught:
            stp.compile("dualpipe", p=3, m=6)
        self.assertEqual(caught.exception.code, "E0011")
        self.assertIn("p must be even", caught.exception.report)

    def test_unknown_names_and_bad_arguments(self):
        with self.assertRaises(stp.StpError) as caught:
            stp.compile("1f1c", p=2, m=2)
        self.assertIn("1f1b", str(caught.exception), "the standard schedules are listed")
        with self.assertRaises(TypeError):
            stp.compile("1f1b", p="2", m=2)
        with self.assertRaises(TypeError):
            stp.compile("1f1b", p=2, m=2, params={"x": 1.5})
        with self.assertRaises(ValueError):
            stp.compile("1f1b", p=2, m=2, solver="magic")
        with self.assertRaises(ValueError):
            stp.compile("1f1b", p=2, m=2, comm="carrier-pigeon")
        with self.assertRaises(stp.CostError) as caught:
            stp.simulate("1f1b", p=2, m=2, cost={"stages": [{"forward": 1}] * 3})
        self.assertIn("backward_input", str(caught.exception))
        stage = {"forward": 1, "backward_input": 1, "backward_weight": 1, "tp_collective": 0}
        with self.assertRaises(stp.CostError) as caught:
            stp.simulate("1f1b", p=2, m=2, cost={"stages": [stage] * 3})
        self.assertIn("3 stages, but this program has 2", str(caught.exception))
        with self.assertRaises(stp.CostError):
            stp.simulate(stp.compile("1f1b", p=2, m=2), cost={"forward": -1})

    def test_hostile_sizes_are_refused_with_the_limit(self):
        with self.assertRaises(stp.CompileError) as caught:
            stp.compile("1f1b", p=10**12, m=2)
        self.assertEqual(caught.exception.code, "E0016")
        with self.assertRaises(stp.CompileError) as caught:
            stp.compile("1f1b", p=-1, m=2)
        self.assertEqual(caught.exception.code, "E0010")
        with self.assertRaises(ValueError) as caught:
            stp.compile("1f1b", p=2**70, m=2)
        self.assertIn("out of range", str(caught.exception))
        with self.assertRaises(ValueError):
            stp.compile("1f1b", p=2, m=2, tp=0)
        with self.assertRaises(stp.CompileError) as caught:
            stp.compile("schedule s(p: ranks) {" + "(" * 5000 + ")" * 5000 + "}", p=2)
        self.assertEqual(caught.exception.code, "E0016")

    def test_a_tampered_program_is_refused(self):
        program = json.loads(stp.compile("1f1b", p=2, m=2).to_json())
        instrs = program["ranks"][1]["instrs"]
        instrs.remove(next(i for i in instrs if "free" in i))
        with self.assertRaises(stp.VerifyError) as caught:
            stp.Program.from_json(json.dumps(program))
        self.assertIn("freed", caught.exception.report)
        with self.assertRaises(stp.VerifyError):
            stp.verify("{not json")

    def test_explain_describes_every_code_it_raises(self):
        self.assertIn("missing or repeated pass", stp.explain("E0018"))
        with self.assertRaises(ValueError):
            stp.explain("E9999")


if __name__ == "__main__":
    unittest.main()
