"""Mutation testing: does the suite catch single-line bugs in the solver and the kernels?

    python tests/mutation.py              # every mutant (about 20-40 minutes on 2 cores)
    python tests/mutation.py --list       # the mutants, numbered
    python tests/mutation.py --only 3 7   # some of them

Not part of the test run (too slow); run it after large changes to the step algebra, the
backends or the kernels, and fix or explain every survivor.

Why a script and not mutmut or cosmic-ray: those generate hundreds of operator mutants per file
and rerun the chosen tests for each; one of this suite's test files costs 10-60 s of JAX
compilation, so a full run would take days on 2 cores. Instead each mutant here is a chosen
single-line bug of the kind that gives a plausible wrong answer (a sign, a floor, an index, a
mask), applied to a copy of the repository, with the test files that should catch it.
A mutant is killed when those tests fail (``pytest -x``: the first failure ends the run).

Known survivors (2026-11-27: 16 of 22 killed), each equivalent at the suite's tolerances or
unreachable with valid input; a new survivor is a missing test:
 4  c = 1 stage times off by one ulp of t: field values move at rounding level (~1e-16),
    visible only for a field discontinuous in t at a step end.
 5  error <= 1 instead of < 1: differs only when the scaled error is exactly 1.0.
 6  the halving of a rejected step within 100 ulps of t1: a rejected step's proposal is at
    least 10% shorter than the attempt, which already ended at t1 or below the clip floor, so
    the branch needs a step of under ~1,000 ulps; kept for parity with diffrax.
 7  the last fixed step one ulp off t1: the 100-ulp clip to t1 puts it on t1 anyway
    (tests/test_oracle.py::test_fixed_steps_end_exactly_on_t1_from_an_inexact_interval).
 8  theta = 1 instead of 0 on a zero-length step: there every k is 0, so y(theta) = y0.
12  a non-finite next step time not reported: only a non-finite dt0, t0 or t1 makes one, and
    solve() does not yet refuse dt0=nan up front (a gap in input validation, not in the loop).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import NamedTuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Mutant(NamedTuple):
    path: str
    old: str  # must occur exactly once in the file
    new: str
    tests: tuple  # test files (or node ids) expected to catch it
    why: str


ORACLE = ("tests/test_oracle.py",)
GRADS = ("tests/test_gradients.py",)
KERNELS = ("tests/test_kernels.py",)
ALLSAVE = ("tests/test_allsave.py",)

MUTANTS = [
    # -- the four that survived the suite of 2026-11-27 (issue 15)
    Mutant("fusedrk/_reference.py", "jnp.sum(g, axis=1)", "g[:, 0]", GRADS,
           "t0 == t1 with repeated save times: the gradient counts one save"),
    Mutant("fusedrk/_solve.py", "jnp.full_like(t0, _step.AUTO_DT0) if choose_dt0",
           "jnp.full_like(t0, _step.AUTO_DT0) * direction if choose_dt0", ORACLE,
           "adaptive backward solve with dt0=None: lanes run to max_steps"),
    Mutant("kernels/forward.py", "_triton.count_if(k.t_start == k.t_end, T), fill",
           "_triton.count_if(k.t_start == k.t_end, 0), fill",
           KERNELS, "kernels with t0 == t1 return inf instead of y0"),
    Mutant("fusedrk/_step.py", "jnp.where(keep, 1, FACTOR_MIN)", "jnp.where(keep, 1, FACTOR_MIN / 2)", ORACLE,
           "rejected steps shrink by half the controller's floor"),
    # -- step algebra
    Mutant("fusedrk/_step.py", "return tuple(t0 if c == 0 else (t1 if c == 1 else t0 + c * dt) for c in C)",
           "return tuple(t0 if c == 0 else t0 + c * dt for c in C)", ORACLE,
           "c = 1 stages at t0 + dt instead of t1 exactly (last bits of the stage time)"),
    Mutant("fusedrk/_step.py", "    keep = error < 1\n", "    keep = error <= 1\n", ORACLE,
           "accept an error of exactly 1"),
    Mutant("fusedrk/_step.py", "    tclip = jnp.where(keep, t_end, tprev + 0.5 * (t_end - tprev))",
           "    tclip = jnp.where(keep, t_end, t_end)", ORACLE, "a rejected step near t1 is not halved"),
    Mutant("fusedrk/_step.py", "    return jnp.where(steps_completed == num_steps, t_end, out)", "    return out",
           ORACLE, "the last fixed step does not land on t1 exactly"),
    Mutant("fusedrk/_step.py", "    return jnp.where(same, 0, t - t0) / jnp.where(same, 1, t1 - t0)",
           "    return jnp.where(same, 1, t - t0) / jnp.where(same, 1, t1 - t0)", ORACLE,
           "interpolation at a zero-length step"),
    Mutant("fusedrk/_step.py", "            w = w * (theta * theta + p * theta + q)",
           "            w = w * (theta * theta + p * theta - q)", ORACLE, "a dense-output weight's constant term"),
    Mutant("fusedrk/_step.py", "    y0_bar = tuple(a + b for a, b in zip(y0_bar, y_bar))",
           "    y0_bar = tuple(b for a, b in zip(y0_bar, y_bar))", GRADS,
           "interpolation VJP drops the cotangent already on y0"),
    Mutant("fusedrk/_step.py", "            k_bars[j] = tuple(kb + a * g for kb, g in zip(k_bars[j], y_i_bar))",
           "            k_bars[j] = tuple(kb + g for kb, g in zip(k_bars[j], y_i_bar))", GRADS,
           "stage VJP ignores the Butcher coefficient"),
    Mutant("fusedrk/_step.py", "        nonfinite=(accept & ~all_finite(y1)) | (active & ~jnp.isfinite(new_tnext)),",
           "        nonfinite=(accept & ~all_finite(y1)),", ("tests/test_errors.py",),
           "a NaN step size is not reported"),
    # -- the jax backend's loop and tape
    Mutant("fusedrk/_reference.py", "        mask = tape.accepted[row]", "        mask = tape.accepted[row] | True", GRADS,
           "rejected steps contribute to the gradient"),
    Mutant("fusedrk/_reference.py", "    return tprev, tnext, (n >= 0) & (n < num_accepted)",
           "    return tprev, tnext, (n >= 0) & (n < num_accepted - 1)", GRADS,
           "fixed steps: the last step left out of the gradient (both backends)"),
    Mutant("fusedrk/_reference.py", "    start_y_bar, start_args_bar = field_vjp(t_start, y0, f_bar)",
           "    start_y_bar, start_args_bar = field_vjp(t_start, y0, tuple(0 * x for x in f_bar))", GRADS,
           "the first FSAL evaluation gets no cotangent"),
    # -- solve()
    Mutant("fusedrk/_solve.py", "    return int(np.ceil(span / np.nextafter(dt, np.inf)))", "    return int(np.ceil(span / dt))",
           ("tests/test_errors.py",) + ORACLE, "fixed-step count from concrete times one off at exact multiples"),
    Mutant("fusedrk/_solve.py", "            if (c1 - c0) * cd < 0:", "            if (c1 - c0) * cd < -1:", ("tests/test_errors.py",),
           "a dt0 of the wrong sign is accepted"),
    # -- kernels
    Mutant("kernels/forward.py", "        mask = accept & (j >= index) & (t_save <= tnext)",
           "        mask = accept & (t_save <= tnext)", KERNELS, "a lane overwrites a save it already made"),
    Mutant("kernels/reverse.py", 'loaded["mask"] = _triton.load_lanes(accepted_ref.at[row, lanes], written, 0, interpret) != 0',
           'loaded["mask"] = _triton.load_lanes(accepted_ref.at[row, lanes], written, 0, interpret) == 0',
           KERNELS, "the reverse kernel sweeps rejected steps"),
    Mutant("kernels/reverse.py", "                    return (s[0] >= 0) & (save_at_ref[j] >= n)",
           "                    return (s[0] >= 0) & (save_at_ref[j] > n)", KERNELS,
           "fixed steps: the reverse kernel's save walk stops before the saves of step n"),
    Mutant("kernels/reverse.py", "                mask = saved_at == n", "                mask = saved_at >= n", KERNELS,
           "a save's cotangent injected more than once"),
    Mutant("fusedrk/_shard.py", "jnp.concatenate([x, jnp.repeat(x[-1:], extra, axis=0)])",
           "jnp.concatenate([x, jnp.zeros((extra,) + x.shape[1:], x.dtype)])", KERNELS,
           "padded lanes start at zero: a field NaN there poisons shared cotangents"),
    # -- the reverse kernel's pipelined sweep (2026-12-07)
    Mutant("fusedrk/_schedule.py", "            following = load_at(i + 1)",
           "            following = load_at(i)", KERNELS,
           "the pipelined reverse sweep loads the row it is on again instead of the next"),
    # -- AllSaveAdjoint
    Mutant("fusedrk/_allsave.py", "            return (row - 1, *pull(row, row < lane_n, f_bar, k_bar))",
           "            return (row - 2, *pull(row, row < lane_n, f_bar, k_bar))", ALLSAVE,
           "the backward pass skips every other step"),
    Mutant("fusedrk/_allsave.py", "            return row - 1, _on_its_own(one, (pieces, words)",
           "            return row - 2, _on_its_own(one, (pieces, words)", ALLSAVE,
           "the packed backward pass (a small step on CPU) skips every other step"),
    Mutant("fusedrk/_allsave.py",
           "                vmapped_mode if any(jax.tree_util.tree_leaves(in_batched[1])) else unbatched_mode))",
           "                vmapped_mode))", ALLSAVE,
           "jax.jacrev of a packed forward reads the rows it did not write"),
    Mutant("fusedrk/_allsave.py", "                offset += n\n        return out",
           "                offset += 0\n        return out", ALLSAVE,
           "packed bytes unpacked from the wrong offsets"),
    Mutant("fusedrk/_allsave.py", "lax.cond(eqxi.unvmap_any(lane_n > 0), again, untouched, None)",
           "lax.cond(eqxi.unvmap_any(lane_n > 1), again, untouched, None)", ALLSAVE,
           "a step that saved once is treated as one that saved nothing"),
    Mutant("fusedrk/_allsave.py", "        read = {i for i in candidates if jaxpr.invars[i] in live}",
           "        read = set()", ALLSAVE, "a buffer the loop reads back is zeroed in the re-run"),
    # -- AllSaveAdjoint(store="inputs"), the default under jax.vmap on a CPU (2026-12-07)
    Mutant("fusedrk/_allsave.py", "                residuals = [*(f[i] for i in live), *a] if record",
           "                residuals = [*(out_f[i] for i in live), *out_a] if record", ALLSAVE,
           "each step stores its outputs, not its inputs"),
    Mutant("fusedrk/_liveness.py", "        if grown == needed:\n            break",
           "        if True:\n            break", ALLSAVE,
           "a while loop's carries followed one body deep, not to the fixpoint"),
    Mutant("fusedrk/_liveness.py", " | {j for j, v in enumerate(cond.invars[nc:]) if v in cond_live}", "", ALLSAVE,
           "what a while loop's condition reads is not live"),
    # -- the jax backend's lean fixed-step loops (2026-12-07)
    Mutant("fusedrk/_reference.py", "        return jnp.where(new, n - 1, failed_at), jnp.where(new, tprev, t_final)",
           "        return jnp.where(new, n, failed_at), jnp.where(new, tprev, t_final)",
           ("tests/test_tape.py::test_the_lean_fixed_step_forward_equals_the_general_one",),
           "a lane's failing step is not counted"),
    Mutant("fusedrk/_reference.py", "_step.lane_where(mask, _add(y_bar, f0_y_bar), y_bar)",
           "_step.lane_where(mask, y_bar, y_bar)",
           ("tests/test_tape.py::test_a_gradient_whose_tape_is_empty_runs_lean_loops_equal_to_the_general_ones",),
           "the lean sweep drops each step's FSAL cotangent"),
    Mutant("fusedrk/_reference.py", "saved_in = jnp.zeros((config.rows,), bool).at[saved].set(True, mode=\"drop\")",
           "saved_in = jnp.zeros((config.rows,), bool).at[saved].set(False, mode=\"drop\")",
           ("tests/test_tape.py::test_a_gradient_whose_tape_is_empty_runs_lean_loops_equal_to_the_general_ones",),
           "the lean sweep skips the saves' cotangents"),
    # -- the lean sweep's unmasked iterations (2026-12-07)
    Mutant("fusedrk/_reference.py", "every_lane_from = fwd.num_iters - jnp.min(fwd.num_accepted)",
           "every_lane_from = fwd.num_iters - jnp.min(fwd.num_accepted) - 1",
           ("tests/test_tape.py::test_a_gradient_whose_tape_is_empty_runs_lean_loops_equal_to_the_general_ones",),
           "the lean sweep leaves a failed lane unmasked one iteration too many"),
    # -- finished adaptive lanes write no tape rows (2026-12-07)
    Mutant("kernels/forward.py", "    written = step.accept | step.reject if skips_finished_rows(config) else None",
           "    written = None", ("tests/test_kernels.py::test_finished_adaptive_lanes_write_no_tape_rows",),
           "finished lanes keep writing tape rows"),
    Mutant("kernels/reverse.py", "            written = (n >= 0) & (n < lane_iters) if skips_finished_rows(config) else None",
           "            written = None",
           ("tests/test_kernels.py::test_gradients_of_lanes_finishing_apart_equal_the_jax_backend",),
           "the reverse kernel reads the rows a finished lane never wrote"),
    Mutant("kernels/reverse.py", "fallback = [y_init] + [zeros] * TAPE_STAGES",
           "fallback = [zeros] * (1 + TAPE_STAGES)",
           ("tests/test_kernels.py::test_gradients_of_lanes_finishing_apart_equal_the_jax_backend",),
           "an unwritten row reads as the state 0, where a field may be singular"),
    # -- the tape stores only the state components the VJP reads (2026-12-07)
    Mutant("fusedrk/_liveness.py", "    invars, out, i = program.jaxpr.invars, [], _size(t_spec)",
           "    invars, out, i = program.jaxpr.invars, [], 0",
           ("tests/test_tape.py::test_which_fields_vjp_reads_the_state",),
           "the per-component liveness reads the flags of the wrong inputs"),
    Mutant("fusedrk/_reference.py", "out.append(leaf.reshape(leaf.shape[0], size)[:, np.asarray(live)])",
           "out.append(leaf.reshape(leaf.shape[0], size)[:, :len(live)])",
           ("tests/test_tape.py::test_a_tape_of_the_components_the_vjp_reads_gives_the_same_gradients",),
           "the jax backend stores the first components of a partly read leaf, not the read ones"),
    Mutant("kernels/reverse.py", "jnp.int32(s * len(columns) + position[i])", "jnp.int32(s * len(columns) + i)",
           ("tests/test_tape.py::test_a_tape_of_the_components_the_vjp_reads_gives_the_same_gradients",),
           "the reverse kernel reads a stored component from the column of its index in the state"),
    # -- launch shape (issue 12)
    Mutant("kernels/_triton.py", "tile > MIN_LANE_TILE and -(-batch // tile) < sms",
           "tile > MIN_LANE_TILE and -(-batch // tile) <= sms",
           ("tests/test_kernels.py::test_launch_fills_every_sm_before_growing_tiles",),
           "a batch that exactly covers the SMs with 128-lane tiles is split into smaller ones"),
    Mutant("kernels/_triton.py", "        sms = sm_count()", "        sms = None",
           ("tests/test_kernels.py::test_the_launch_follows_the_gpu_it_is_built_for",),
           "the kernels ignore the GPU's SM count"),
    Mutant("kernels/_triton.py", "    if interpret:\n        sms = None", "    if False:\n        sms = None",
           ("tests/test_kernels.py::test_launch_fills_every_sm_before_growing_tiles",),
           "interpret mode sizes its tiles for a GPU's SMs (more programs, run one after another)"),
]


def _copy_repository(dest: str) -> None:
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for f in files:
        target = os.path.join(dest, f)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copy2(os.path.join(ROOT, f), target)
    # fusedrk.kernels from the copy's kernels/ (the installed package maps it the same way).
    os.symlink(os.path.join(dest, "kernels"), os.path.join(dest, "fusedrk", "kernels"))


def run_mutant(m: Mutant, timeout_s: float) -> tuple:
    with tempfile.TemporaryDirectory(prefix="fusedrk-mutant.") as copy:
        _copy_repository(copy)
        path = os.path.join(copy, m.path)
        source = open(path).read()
        if source.count(m.old) != 1:
            return "stale", 0.0, f"the original text occurs {source.count(m.old)} times in {m.path}"
        with open(path, "w") as fh:
            fh.write(source.replace(m.old, m.new))
        env = dict(os.environ, PYTHONPATH=copy)
        start = time.perf_counter()
        try:
            out = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *m.tests],
                                 cwd=copy, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return "timeout", time.perf_counter() - start, ""
        seconds = time.perf_counter() - start
        failed = [line for line in out.stdout.splitlines() if line.startswith(("FAILED", "ERROR"))]
        return ("killed" if out.returncode else "survived"), seconds, (failed[0] if failed else out.stdout.strip()[-200:])


def main() -> int:
    parser = argparse.ArgumentParser(prog="python tests/mutation.py", description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--only", type=int, nargs="*", help="mutant numbers to run")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per mutant")
    opts = parser.parse_args()
    chosen = [(i, m) for i, m in enumerate(MUTANTS) if not opts.only or i in opts.only]
    if opts.list:
        for i, m in chosen:
            print(f"{i:2d} {m.path}: {m.why}")
        return 0
    survivors = 0
    for i, m in chosen:
        status, seconds, detail = run_mutant(m, opts.timeout_s)
        survivors += status != "killed"
        print(f"{i:2d} {status:8s} {seconds:6.0f} s  {m.path}: {m.why}\n            {detail}", flush=True)
    print(f"mutation score: {len(chosen) - survivors} of {len(chosen)} killed")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
