"""One jit-compiled training step of a JumpReLU SAE in JAX, by the recipe of train/trainer.py:
Adam(β1 = 0, β2 = 0.999) via optax or schedule-free signum, the decoder gradient's component
along each (unit) row removed before the step and the rows renormalised after it, θ kept above 1e-6. The learning
rate and λ come in as arguments, computed on the host by train/schedule.py, so both backends
share one schedule."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..sae.objectives import Objective
from .sae import Params, loss


class State(NamedTuple):
    params: Params
    opt: object       # the optimizer's state


@dataclass(frozen=True)
class Adam:
    """Adam's direction (optax) times the step's learning rate (the paper: β1 = 0)."""

    b1: float = 0.0
    b2: float = 0.999
    eps: float = 1e-8

    def _transform(self) -> optax.GradientTransformation:
        return optax.scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps)

    def init(self, params: Params):
        return self._transform().init(params)

    def step(self, grads: Params, state, params: Params, lr, steps) -> tuple[Params, object]:
        direction, state = self._transform().update(grads, state, params)
        return jax.tree.map(lambda p, d: p - lr * d, params, direction), state

    def tensors(self, state) -> dict[str, np.ndarray]:
        return {"count": np.array(state.count), **{f"{part}.{k}": np.array(v) for part in ("mu", "nu")
                                                  for k, v in getattr(state, part).items()}}

    def from_tensors(self, saved: dict, params: Params, place):
        fresh = self.init(params)
        return fresh._replace(count=jnp.asarray(int(saved["count"]), dtype=fresh.count.dtype),
                              mu=place({k: saved[f"mu.{k}"] for k in params}),
                              nu=place({k: saved[f"nu.{k}"] for k in params}))

    def average(self, state, params: Params) -> Params:
        return params


class SignumState(NamedTuple):
    z: Params               # the sign-descent sequence
    weight_sum: jax.Array   # Σ lr_max² over the steps so far
    lr_max: jax.Array


@dataclass(frozen=True)
class Signum:
    """Sign descent under schedule-free averaging, as `schedulefree.ScheduleFreeWrapper` over
    SGD on sign(g) does it in the PyTorch backend: the parameters are y = x + (1 − β)(z − x),
    the gradient taken there moves z by −lr·sign(g), and the average x follows z with weight
    lr_max² / Σ lr_max²; x is recovered from y and z, so a constraint applied to y carries over.
    Parameters in activation units step lr × their entry of `steps` (train/step.py: SIGNUM_UNITS)."""

    momentum: float = 0.95

    def init(self, params: Params) -> SignumState:
        zero = jnp.zeros((), jnp.float32)
        return SignumState(jax.tree.map(jnp.array, params), zero, zero)

    def step(self, grads: Params, state: SignumState, params: Params, lr, steps) -> tuple[Params, SignumState]:
        b = self.momentum
        lr_max = jnp.maximum(state.lr_max, lr)
        weight_sum = state.weight_sum + lr_max ** 2
        c = lr_max ** 2 / weight_sum
        x = self.average(state, params)
        z = {k: v - lr * steps.get(k, 1.0) * jnp.sign(grads[k]) for k, v in state.z.items()}
        x = jax.tree.map(lambda x, z: x + c * (z - x), x, z)
        y = jax.tree.map(lambda x, z: x + (1 - b) * (z - x), x, z)
        return y, SignumState(z, weight_sum, lr_max)

    def average(self, state: SignumState, params: Params) -> Params:
        b = self.momentum
        return jax.tree.map(lambda y, z: (y - (1 - b) * z) / b, params, state.z)

    def tensors(self, state: SignumState) -> dict[str, np.ndarray]:
        return {"weight_sum": np.array(state.weight_sum), "lr_max": np.array(state.lr_max),
                **{f"z.{k}": np.array(v) for k, v in state.z.items()}}

    def from_tensors(self, saved: dict, params: Params, place) -> SignumState:
        return SignumState(place({k: saved[f"z.{k}"] for k in params}), jnp.asarray(float(saved["weight_sum"]), jnp.float32),
                           jnp.asarray(float(saved["lr_max"]), jnp.float32))


def adam(b1: float = 0.0, b2: float = 0.999, eps: float = 1e-8) -> Adam:
    return Adam(b1, b2, eps)


def optimizer_of(cfg) -> Adam | Signum:
    """The TrainConfig's optimizer."""
    return Signum(cfg.momentum) if cfg.optimizer == "signum" else Adam(cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps)


def init(params: Params, optimizer: Adam | Signum) -> State:
    return State(params, optimizer.init(params))


@partial(jax.jit, static_argnames=("optimizer", "eps", "pre_bias", "objective"))
def train_step(state: State, x: jax.Array, target: jax.Array, lr: float, coeff: float, dead: jax.Array | None = None,
               scale: float = 1.0, steps: dict | None = None, *, optimizer: Adam | Signum, eps: float, pre_bias: bool,
               objective: Objective = Objective()) -> tuple[State, dict]:
    """One step on normalised x and target, the gradient that of `scale` × the loss (loss "fvu":
    1 / the batch's total variance); returns the new state and {loss, mse, l0, fired}."""
    def scaled(params):
        value, aux = loss(params, x, target, coeff, dead, eps=eps, pre_bias=pre_bias, objective=objective)
        return value * scale, (value, aux)

    (_, (value, aux)), grads = jax.value_and_grad(scaled, has_aux=True)(state.params)
    w = state.params["W_dec"]
    g = grads["W_dec"]
    grads = {**grads, "W_dec": g - (g * w).sum(1, keepdims=True) * w}  # no change of a row's norm
    params, opt_state = optimizer.step(grads, state.opt, state.params, lr, steps or {})
    w = params["W_dec"]
    params["W_dec"] = w / jnp.maximum(jnp.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    if "theta" in params:
        params["theta"] = jnp.maximum(params["theta"], 1e-6)
    return State(params, opt_state), {"loss": value, **aux}
