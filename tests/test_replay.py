"""Zero replay: the backward pass never re-runs a step; it applies one field VJP per stage.

Counted with a host callback inside the vector field (B = 1, so one call is one batched
evaluation). Measured on this project's CPU machine, 20 fixed steps on [0, 2]:

    forward only (fusedrk or diffrax)                     121 = 1 + 6 x 20
    jit(grad) fusedrk                                     242 = forward + 121 VJPs
    jit(grad) diffrax RecursiveCheckpointAdjoint()        406
    jit(grad) diffrax RecursiveCheckpointAdjoint(100)     363 = forward + replay + VJPs
"""

import diffrax
import jax
import jax.numpy as jnp
import pytest

import fusedrk
from conftest import CountedField, diffrax_solve

@pytest.mark.parametrize("adaptive", [False, True])
def test_backward_evaluates_each_stage_once(x64, adaptive):
    counted_field = CountedField()
    y0, k = jnp.ones(1), jnp.full((1,), 0.5)
    tol = dict(rtol=1e-6, atol=1e-8) if adaptive else {}

    def ours(y0, k):
        return jnp.sum(fusedrk.solve(counted_field, y0, 0.0, 2.0, args=k, args_axes=0, dt0=0.1, **tol).ys)

    def recursive_checkpoint(y0, k):
        return jnp.sum(diffrax_solve(counted_field, y0, 0.0, 2.0, args=k, args_axes=0, dt0=0.1,
                                     adjoint=diffrax.RecursiveCheckpointAdjoint(checkpoints=100),
                                     max_steps=100, **tol).ys)

    steps = int(fusedrk.solve(counted_field, y0, 0.0, 2.0, args=k, args_axes=0, dt0=0.1, **tol).stats["num_steps"][0])
    forward = counted_field.count(jax.jit(ours), y0, k)
    assert forward == 1 + 6 * steps  # FSAL: six new stages per attempted step
    with_grad = counted_field.count(jax.jit(jax.grad(ours, argnums=(0, 1))), y0, k)
    assert with_grad == 2 * forward  # the backward adds exactly one VJP per forward evaluation
    assert counted_field.count(jax.jit(jax.grad(recursive_checkpoint, argnums=(0, 1))), y0, k) > with_grad + steps
