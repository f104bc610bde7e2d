"""One jit-compiled training step of a JumpReLU SAE in JAX, by the recipe of train/trainer.py:
Adam(β1 = 0, β2 = 0.999) via optax, the decoder gradient's component along each (unit) row
removed before the step and the rows renormalised after it, θ kept above 1e-6. The learning
rate and λ come in as arguments, computed on the host by train/schedule.py, so both backends
share one schedule."""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from ..sae.objectives import Objective
from .sae import Params, loss


class State(NamedTuple):
    params: Params
    adam: optax.OptState


def adam(b1: float = 0.0, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """Adam's direction without the learning rate (the paper: β1 = 0); the step scales it."""
    return optax.scale_by_adam(b1=b1, b2=b2, eps=eps)


def init(params: Params, optimizer: optax.GradientTransformation) -> State:
    return State(params, optimizer.init(params))


@partial(jax.jit, static_argnames=("optimizer", "eps", "pre_bias", "objective"))
def train_step(state: State, x: jax.Array, target: jax.Array, lr: float, coeff: float, dead: jax.Array | None = None, *,
               optimizer: optax.GradientTransformation, eps: float, pre_bias: bool,
               objective: Objective = Objective()) -> tuple[State, dict]:
    """One step on normalised x and target; returns the new state and {loss, mse, l0, fired}."""
    (value, aux), grads = jax.value_and_grad(loss, has_aux=True)(state.params, x, target, coeff, dead, eps=eps,
                                                                  pre_bias=pre_bias, objective=objective)
    w = state.params["W_dec"]
    g = grads["W_dec"]
    grads = {**grads, "W_dec": g - (g * w).sum(1, keepdims=True) * w}  # no change of a row's norm
    direction, adam_state = optimizer.update(grads, state.adam, state.params)
    params = jax.tree.map(lambda p, d: p - lr * d, state.params, direction)
    w = params["W_dec"]
    params["W_dec"] = w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    if "theta" in params:
        params["theta"] = jnp.maximum(params["theta"], 1e-6)
    return State(params, adam_state), {"loss": value, **aux}
