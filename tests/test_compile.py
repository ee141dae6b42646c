"""The kernels are valid GPU programs: lowered for CUDA on any machine, their Triton IR verifies.

Lowering does not verify the IR; XLA does, when it compiles on the GPU, which is where an
invalid kernel used to be found first. Here every kernel of ``bench/compile_check.VARIANTS``
(lowered through the public ``solve``), and of one catalogue field (the full catalogue is left
to ``bench/compile_check.py``: its kernels are larger), goes through the Triton IR verifier, on
jax 0.10.2 and on 0.11.x (an abstract H100). The full compile through XLA's GPU pipeline runs when the CUDA
plugin is installed (see bench/compile_check.py) and is skipped otherwise.
"""

import importlib.util
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax import lax
from jax.experimental import pallas as pl

from bench import compile_check
from fusedrk.kernels import _triton

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# float64, adaptive steps, a [8] state with broadcasting, sines and a reduction in the field;
# the MLP: its weight matrices are blocks (3-d products and reductions in the Triton IR); the
# seed: linear, so its ring holds no state (fusedrk/_liveness.py).
CI_CATALOGUE = [compile_check.CatalogueVariant("kuramoto-8", "float64", True),
                compile_check.CatalogueVariant("neural-ode-mlp", "float32", False),
                compile_check.CatalogueVariant("seed", "float32", False)]


@pytest.mark.parametrize("variant", compile_check.VARIANTS + CI_CATALOGUE, ids=lambda v: v.name)
def test_every_kernel_verifies(variant):
    kernels = compile_check.lower_variant(variant)
    assert [name for name, _ in kernels] == ["fusedrk_forward", "fusedrk_reverse"]
    for name, error in kernels:
        assert error is None, f"{name}: {error}"


def _loop_bound_kernel(bound):
    """A kernel with a data-dependent fori_loop bound, as the kernels' t0 == t1 fill has."""

    def kernel(x_ref, o_ref):
        def body(i, acc):
            return acc + x_ref[...]

        o_ref[...] = lax.fori_loop(jnp.int32(0), bound(x_ref[0] > 0), body, jnp.zeros_like(x_ref[...]))

    x = jnp.ones((16,), jnp.float32)
    call = lambda x: pl.pallas_call(  # noqa: E731
        kernel, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),
        compiler_params=_triton.pl_triton.CompilerParams(num_warps=1, num_stages=1))(x)
    with _triton.gpu_lowering() as modules:
        jax.jit(call).trace(x).lower(lowering_platforms=("cuda",))
    assert len(modules) == 1
    return _triton.verify_error(modules[0])


def test_the_gate_catches_an_untyped_loop_bound():
    # The bug every kernel had until 2026-11-27: weak-typed literals in the bound's select.
    error = _loop_bound_kernel(lambda c: jnp.where(c, 4, 0))
    assert error is not None and "scf.for" in error
    assert _loop_bound_kernel(lambda c: _triton.count_if(c, 4)) is None


def test_solve_refuses_compiled_kernels_without_a_gpu_outside_the_gate():
    if jax.default_backend() == "gpu":
        pytest.skip("a GPU is present")
    loss, inputs = compile_check.problem(compile_check.VARIANTS[0])
    with pytest.raises(ValueError, match="interpret=True"):
        jax.jit(loss).trace(*inputs)


HAS_CUDA_COMPILER = (importlib.util.find_spec("jax_plugins") is not None
                     and importlib.util.find_spec("jax_plugins.xla_cuda12") is not None)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_CUDA_COMPILER, reason="needs jax-cuda12-pjrt (XLA's GPU compiler); see bench/compile_check.py")
def test_full_compile_for_an_h100():
    names = [compile_check.VARIANTS[0].name, compile_check.VARIANTS[-1].name]
    out = subprocess.run([sys.executable, "bench/compile_check.py", "--variants", *names], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "| yes |" in line]
    assert len(rows) == 4, out.stdout[-3000:]


def test_the_bench_compiles_every_catalogue_field():
    from fusedrk import problems

    assert {v.field for v in compile_check.CATALOGUE_VARIANTS} >= set(problems.CATALOGUE_NAMES)


def test_shared_cotangents_are_summed_once_per_tile():
    # A shared argument's cotangent is accumulated per lane through the backward walk and summed
    # over the tile once at its end. Summed inside every VJP pull instead, it put one cross-warp
    # reduction per shared component and field evaluation into the step loop (329 in this
    # reverse kernel; a fifth of the operations of an MLP's).
    v = compile_check.CatalogueVariant("lotka-volterra-5", "float32", False, B=129)
    shared = 25  # the interaction matrix A, [5, 5]; the growth rates r are per lane
    fn, inputs = compile_check._grad_fn(v)
    with _triton.gpu_lowering() as modules:
        fn.trace(*inputs).lower(lowering_platforms=("cuda",))
    # `tt.reduce` ops, not the `tt.reduce.return` in their bodies; generic or custom printing.
    reductions = {_triton.kernel_name(m): len(re.findall(r"\btt\.reduce\b(?!\.)", str(m))) for m in modules}
    # The loop's own reductions (a tile-wide "any lane running" and save-time tests): a few.
    assert reductions["fusedrk_forward"] <= 8
    assert reductions["fusedrk_reverse"] <= shared + 8, reductions
