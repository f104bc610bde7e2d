"""JumpReLU SAEs and transcoders as pure JAX functions over a parameter pytree (SPEC §2), with the
straight-through pseudo-derivatives as `jax.custom_vjp`. The same maths as sae/jumprelu.py:

    pre = (x − b_dec·[pre-encoder bias]) W_enc + b_enc,  f = pre · H(pre − θ),  x̂ = f W_dec + b_dec
    loss = E‖x̂ − target‖² + λ · E Σ H(pre − θ)
    ∂f/∂θ := −(θ/ε) K((pre − θ)/ε),  ∂H/∂θ := −(1/ε) K((pre − θ)/ε),  K the rectangle on (−½, ½)

and the objectives of sae/objectives.py (quadratic and tanh sparsity, the frequency penalty,
Matryoshka prefixes, the dead-latent loss, the input STE, the norm cap), chosen by the same `Objective`.

Parameters travel between the backends through `from_torch` / `to_torch`, so an SAE trained
here is saved by the same formats code and read by everything else in saescope."""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import torch

from ..sae.objectives import Objective

Params = dict[str, jax.Array]  # W_enc [d_in, m], b_enc [m], W_dec [m, d_out], b_dec [d_out], theta or log_theta [m]


def _kernel(z: jax.Array, theta: jax.Array, eps: float) -> jax.Array:
    u = (z - theta) / eps
    return ((u > -0.5) & (u < 0.5)).astype(z.dtype)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def jumprelu(z: jax.Array, theta: jax.Array, eps: float, input_ste: bool = False) -> jax.Array:
    """z · H(z − θ); ∂/∂z = H(z − θ) (+ (θ/ε)·K with the input STE), ∂/∂θ := −(θ/ε)·K."""
    return z * (z > theta).astype(z.dtype)


def _jumprelu_fwd(z, theta, eps, input_ste):
    return jumprelu(z, theta, eps, input_ste), (z, theta)


def _jumprelu_bwd(eps, input_ste, saved, g):
    z, theta = saved
    kernel_part = g * (theta / eps) * _kernel(z, theta, eps)
    dz = g * (z > theta).astype(z.dtype) + (kernel_part if input_ste else 0.0)
    return dz, -kernel_part.sum(0)


jumprelu.defvjp(_jumprelu_fwd, _jumprelu_bwd)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def step(z: jax.Array, theta: jax.Array, eps: float, input_ste: bool = False) -> jax.Array:
    """H(z − θ); ∂/∂z = 0 ((1/ε)·K with the input STE), ∂/∂θ := −(1/ε)·K."""
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, eps, input_ste):
    return step(z, theta, eps, input_ste), (z, theta)


def _step_bwd(eps, input_ste, saved, g):
    z, theta = saved
    kernel_part = g * (1.0 / eps) * _kernel(z, theta, eps)
    return (kernel_part if input_ste else jnp.zeros_like(z)), -kernel_part.sum(0)


step.defvjp(_step_fwd, _step_bwd)


def threshold(params: Params) -> jax.Array:
    return jnp.exp(params["log_theta"]) if "log_theta" in params else params["theta"]


def pre_acts(params: Params, x: jax.Array, pre_bias: bool) -> jax.Array:
    """Encoder pre-activations of normalised input."""
    if pre_bias:
        x = x - params["b_dec"]
    return x @ params["W_enc"] + params["b_enc"]


def _row_errors(x_hat: jax.Array, target: jax.Array) -> jax.Array:
    return ((x_hat - target) ** 2).sum(-1)


def _squared_error(x_hat: jax.Array, target: jax.Array) -> jax.Array:
    return _row_errors(x_hat, target).mean()


def _capped_rows(target: jax.Array, cap: float) -> jax.Array:
    """sae/objectives.py's capped_rows: min(1, (cap·median / ‖t − mean‖)²) per row, no gradient;
    the median is torch's, the lower middle value of an even count."""
    norm = jnp.linalg.norm(target - target.mean(0), axis=1)
    median = jnp.sort(norm)[(norm.shape[0] - 1) // 2]
    rows = (cap * median / jnp.maximum(norm, jnp.finfo(norm.dtype).tiny)) ** 2
    return jax.lax.stop_gradient(jnp.minimum(rows, 1.0))


def loss(params: Params, x: jax.Array, target: jax.Array, coeff: float | jax.Array, dead: jax.Array | None = None, *,
         eps: float, pre_bias: bool, objective: Objective = Objective()) -> tuple[jax.Array, dict]:
    """The training loss on normalised input and target, and {mse, l0, fired}; `dead` marks the
    latents the dead-latent loss reads (with `objective.dead_aux`)."""
    obj = objective
    theta = threshold(params)
    pre = pre_acts(params, x, pre_bias)
    f = jumprelu(pre, theta, eps, obj.input_ste)
    h = step(pre, theta, eps, obj.input_ste)
    tokens, latents = h.sum(-1), h.sum(0)
    w_dec = params["W_dec"]
    bounds = (*obj.matryoshka, w_dec.shape[0])
    rows = _capped_rows(target, obj.norm_cap) if obj.norm_cap else None
    x_hat, recon, lo = params["b_dec"], 0.0, 0
    for hi, weight in zip(bounds, obj.weights):
        x_hat = x_hat + f[:, lo:hi] @ w_dec[lo:hi]
        err = _row_errors(x_hat, target)  # each row's error once: the loss may weigh rows, mse does not
        mse = err.mean()
        recon, lo = recon + weight * (mse if rows is None else (err * rows).mean()), hi
    l0 = tokens.mean()
    if obj.sparsity == "l0":
        penalty = coeff * l0
    elif obj.sparsity == "quadratic":
        gap = l0 - obj.target_l0 if obj.quadratic_form == "batch" else tokens - obj.target_l0
        penalty = coeff * (gap ** 2).mean() / (2 * obj.target_l0)
    else:
        penalty = coeff * jnp.tanh(obj.tanh_scale * f).sum() / x.shape[0]
    total = recon + penalty
    if obj.frequency_penalty:
        share = latents / x.shape[0]
        total = total + obj.frequency_penalty * jnp.maximum(share - obj.frequency_threshold, 0.0).sum()
    if obj.dead_aux and dead is not None:  # AuxK on dead latents' pre-activations (SparseAutoencoder._aux_reference)
        k_aux = min(max(1, x.shape[1] // 2), pre.shape[1])
        vals, idx = jax.lax.top_k(jnp.where(dead, jax.nn.relu(pre), 0.0), k_aux)
        rows = jnp.arange(pre.shape[0])[:, None]
        rec = jnp.zeros_like(pre).at[rows, idx].set(vals) @ w_dec
        residual = target - jax.lax.stop_gradient(x_hat)
        total = total + obj.dead_aux * _squared_error(rec, residual) * dead.any()
    return total, {"mse": mse, "l0": l0, "fired": (f != 0).any(0)}


def encode(params: Params, x: jax.Array, c: float, pre_bias: bool) -> jax.Array:
    """Latent activations of raw input: C·f(x / C) (the training form's C and pre-encoder bias)."""
    pre = pre_acts(params, x / c, pre_bias)
    return c * pre * (pre > threshold(params)).astype(pre.dtype)


def fold(params: Params, c: float, pre_bias: bool) -> Params:
    """The released form (SPEC §2): C and the pre-encoder bias moved into the weights, so that
    encoding raw x with C = 1 and no pre-encoder bias gives the same activations."""
    b_enc = params["b_enc"] - (params["b_dec"] @ params["W_enc"] if pre_bias else 0.0)
    out = {**params, "b_enc": c * b_enc, "b_dec": c * params["b_dec"]}
    if "log_theta" in params:
        out["log_theta"] = params["log_theta"] + jnp.log(c)
    else:
        out["theta"] = c * params["theta"]
    return out


def from_torch(sae) -> tuple[Params, dict]:
    """A PyTorch JumpReLUSAE's parameters as a pytree, and the static settings the loss needs."""
    if sae.cfg.arch != "jumprelu":
        raise ValueError(f"the JAX backend trains JumpReLU SAEs, not {sae.cfg.arch}")
    state = {k: jnp.asarray(v.detach().cpu().numpy()) for k, v in sae.named_parameters()}
    params = {"W_enc": state["W_enc"], "b_enc": state["b_enc"], "W_dec": state["W_dec"], "b_dec": state["b_dec"]}
    if sae.cfg.theta_param == "log":
        params["log_theta"] = state["log_threshold"]
    else:
        params["theta"] = state["theta"]
    return params, {"eps": sae.cfg.bandwidth, "pre_bias": bool(sae.pre_encoder_bias), "objective": sae.objective}


def to_torch(params: Params, sae) -> None:
    """Write the pytree's values into a PyTorch JumpReLUSAE of the same shape (in place)."""
    names = {"theta": "theta", "log_theta": "log_threshold"}
    with torch.no_grad():
        for k, v in params.items():
            getattr(sae, names.get(k, k)).copy_(torch.from_numpy(np.array(v)))
