"""stp.torch and PyTorch's own runtime against real PyTorch: jobs of 2
and 4 processes on gloo (127.0.0.1), float64, each compared with a
single-process run of the same model (python/tests/torch_worker.py).

Without PyTorch these tests are skipped, unless STP_REQUIRE_TORCH=1
(which .ci/run sets, having installed it): then its absence fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import unittest

try:
    import torch  # noqa: F401

    HAVE_TORCH = True
except ImportError:
    HAVE_TORCH = False

REQUIRED = os.environ.get("STP_REQUIRE_TORCH") == "1"
WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torch_worker.py")
EXAMPLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")

# A generous bound for a hang, not a speed test: every job here takes
# seconds; only a deadlock or a lost peer comes near it.
HANG = 600

CHUNKED = {"interleaved-1f1b", "interleaved-1f1b-recompute", "interleaved-zb", "looped-bfs"}
ONE_PIPELINE = [
    "1f1b",
    "1f1b-recompute",
    "gpipe",
    "interleaved-1f1b",
    "interleaved-1f1b-recompute",
    "interleaved-zb",
    "looped-bfs",
    "zb-h1",
    "zb-h2",
    "zb-v",
    "dualpipe-v",
    "stp",
]
SEVERAL_PIPELINES = ["dualpipe", "chimera"]
# DualPipe's placement and routes, the order left to stpc.
DUAL_AUTO = """schedule dual_auto(p: ranks, m: microbatches) {
  stages 2 * p; pipelines 2; route i -> if i < m / 2 { 0 } else { 1 };
  place s -> if s < p { s } else { 2 * p - 1 - s };
  memory { budget = p + 1; } auto;
}"""


def standard_cases(p: int, names: list) -> list:
    cases = []
    for name in names:
        case = {"schedule": name, "p": p, "m": 3 * p if name == "stp" else 2 * p}
        if name in CHUNKED:
            case["v"] = 2
        cases.append(case)
    return cases


def auto_source() -> str:
    with open(os.path.join(EXAMPLES, "auto_looped.sched"), encoding="utf-8") as f:
        return f.read()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, *args: str) -> list:
    """Runs the worker as `world` processes; returns (status, output) per
    process. Output is stdout then stderr."""
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        procs = []
        for rank in range(world):
            env = dict(
                os.environ,
                RANK=str(rank),
                WORLD_SIZE=str(world),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                STP_TEST_DIR=scratch,
                OMP_NUM_THREADS="1",
            )
            procs.append(
                subprocess.Popen(
                    [sys.executable, WORKER, *args],
                    env=env,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
            )
        results = []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=HANG)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise AssertionError(f"the job {args[0]} hung for {HANG} s")
            results.append((proc.returncode, out + err))
        return results


@unittest.skipUnless(HAVE_TORCH or REQUIRED, "PyTorch is not installed (pip install torch)")
class TorchTests(unittest.TestCase):
    def assert_job_ok(self, results: list, expect_lines: int) -> None:
        for rank, (status, output) in enumerate(results):
            self.assertEqual(status, 0, f"process {rank} failed:\n{output[-4000:]}")
        agreed = sum(line.count("agree") for _, output in results for line in output.splitlines())
        self.assertEqual(agreed, expect_lines, "every process reports every case")

    def test_every_standard_schedule_trains_like_one_process_at_world_size_2_and_4(self):
        for p in (2, 4):
            cases = standard_cases(p, ONE_PIPELINE + SEVERAL_PIPELINES)
            cases.append({"label": "auto", "schedule": auto_source(), "p": p, "m": 2 * p})
            cases.append({"label": "auto, two pipelines", "schedule": DUAL_AUTO, "p": p, "m": 2 * p})
            with self.subTest(p=p):
                self.assert_job_ok(launch(p, "train", json.dumps(cases)), p * len(cases))

    def test_tensor_parallel_braids_train_like_one_process(self):
        # 4 processes: 2 pipeline ranks x 2 tensor-parallel ranks. The auto
        # order under a TP collective cost braids F with B (as STP does).
        skewed = {"forward": 1, "backward_input": 2, "backward_weight": 0.5, "tp_collective": 0.25}
        cases = [
            {"schedule": "stp", "p": 2, "m": 6, "tp": 2},
            {"schedule": "1f1b", "p": 2, "m": 4, "tp": 2},
            {"schedule": "zb-v", "p": 2, "m": 4, "tp": 2},
            {"schedule": "1f1b-recompute", "p": 2, "m": 4, "tp": 2},
            {"schedule": "dualpipe", "p": 2, "m": 4, "tp": 2},
            {"label": "auto", "schedule": auto_source(), "p": 2, "m": 6, "tp": 2, "cost": skewed},
        ]
        self.assert_job_ok(launch(4, "train", json.dumps(cases)), 4 * len(cases))

    def test_stages_pass_several_tensors(self):
        # (hidden, integer mask) between stages without units; several
        # pipelines, recompute, braids and a V placement among them.
        cases = [
            {"schedule": "1f1b", "p": 2, "m": 4},
            {"schedule": "zb-v", "p": 2, "m": 4},
            {"schedule": "interleaved-1f1b", "p": 2, "m": 4, "v": 2},
            {"schedule": "1f1b-recompute", "p": 2, "m": 4},
            {"schedule": "dualpipe", "p": 2, "m": 4},
            {"schedule": "stp", "p": 2, "m": 6},
        ]
        self.assert_job_ok(launch(2, "tuples", json.dumps(cases)), 2 * len(cases))

    def test_a_schedule_runs_on_a_subgroup(self):
        self.assert_job_ok(launch(4, "subgroups"), 4)

    def test_the_torch_runtime_trains_stpc_csv_exports_in_both_formats(self):
        for p in (2, 4):
            cases = standard_cases(p, ONE_PIPELINE)
            with self.subTest(p=p):
                self.assert_job_ok(launch(p, "runtime", json.dumps(cases)), p * len(cases) * 2)

    def refusal(self, kind: str) -> str:
        results = launch(2, "refused", kind)
        for rank, (status, output) in enumerate(results):
            self.assertEqual(status, 0, f"process {rank}:\n{output[-4000:]}")
            self.assertIn("REFUSED", output, f"process {rank} was not refused:\n{output[-4000:]}")
        return results[0][1]

    def test_a_program_for_another_world_size_is_refused_on_every_process(self):
        self.assertIn("4 pipeline ranks x tp 1 = 4 processes, but the process group has 2", self.refusal("world"))

    def test_sequence_parallel_programs_are_refused(self):
        self.assertIn("does not run sequence-parallel programs", self.refusal("sequence-parallel"))

    def test_stages_the_rank_does_not_own_are_refused_on_every_process(self):
        self.assertIn("owns stage(s) [1] of 2, but was given stage(s) [0]", self.refusal("stages"))

    def test_a_stage_that_does_not_fit_the_previous_output_is_refused_on_every_process(self):
        self.assertIn("stage 1 (on process 1) fails on stage 0's output, shape (2, 3, 8)", self.refusal("shape"))

    def test_a_peer_that_dies_makes_the_others_fail_clearly(self):
        (status0, out0), (status1, _) = launch(2, "dies")
        self.assertEqual(status1, 3, "process 1 died as the test made it")
        self.assertEqual(status0, 0, out0[-4000:])
        self.assertIn("PEER ERROR", out0)
        # Which transfer it was waiting for depends on how far gloo got.
        self.assertRegex(out0, r"waiting for (send \S+ to|recv \S+ from) pipeline rank 1")

    def test_only_a_verified_program_is_run(self):
        import stp.torch

        with self.assertRaisesRegex(TypeError, "stp.Program"):
            stp.torch.Schedule({"ranks": []}, [], lambda out, target: out.sum())


if __name__ == "__main__":
    unittest.main()
