"""`backend = "jax"`: each JumpReLU SAE's step taken in JAX (train.py); the data, suite,
initialisation, schedules, target-L0 controller, metrics and checkpoints stay the trainer's. The
SAE objects stay the PyTorch ones, refreshed from the JAX parameters whenever they are saved, so
checkpoints and outputs are the same files either backend writes.

With more than one JAX device (TPU cores, GPUs, or host devices from
XLA_FLAGS=--xla_force_host_platform_device_count=N) the step runs on a 1-D mesh over all of them
through jax.sharding, by `parallel.mode`: "data" splits each batch over the devices with the
parameters replicated (XLA all-reduces the gradients), "sae" splits every SAE's latents over the
devices (W_enc's columns, W_dec's rows, b_enc and θ; the batch replicated) for SAEs too wide for
one device. The same jitted step serves all three: only where the arrays live changes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ..errors import SaescopeError
from ..train.step import Backend, Member
from .sae import from_torch, to_torch
from .train import State, init, optimizer_of, train_step


class JaxStep(Backend):
    def __init__(self, cfg):
        archs = sorted({s.arch for s in cfg.saes if s.arch != "jumprelu"})
        if archs:
            raise SaescopeError(f"the JAX backend trains JumpReLU SAEs and transcoders; {', '.join(archs)} "
                                "train with backend 'torch'")
        if any(s.train_as == "batchtopk" for s in cfg.saes):
            raise SaescopeError("the JAX backend trains JumpReLU SAEs as themselves: set train_as 'jumprelu' "
                                "(a target L0 trains as BatchTopK unless told), or use backend 'torch'")
        if any(s.multi_layer for s in cfg.saes):
            raise SaescopeError("the JAX backend trains single-layer dictionaries: use backend 'torch' for clt or crosscoder entries")
        if any(s.skip for s in cfg.saes):
            raise SaescopeError("the JAX backend trains transcoders without a skip connection: use backend 'torch' for skip = true")
        if cfg.precision != "float32":
            raise SaescopeError(f"the JAX backend computes in float32; precision '{cfg.precision}' is for backend 'torch'")
        self.cfg = cfg
        self.optimizer = optimizer_of(cfg)
        self.states: dict[str, tuple[State, dict]] = {}
        devices = jax.devices()
        self.mesh = Mesh(np.array(devices), ("d",)) if len(devices) > 1 else None
        if self.mesh is not None and cfg.parallel.mode == "data" and cfg.batch_size % len(devices):
            raise SaescopeError(f"batch_size {cfg.batch_size} does not split over {len(devices)} JAX devices")
        if self.mesh is not None and cfg.parallel.mode == "sae":
            odd = sorted({w for s in cfg.saes for w in s.widths if w % len(devices)})
            if odd:
                raise SaescopeError(f"widths {odd} do not split over {len(devices)} JAX devices")

    def setup(self, trainer) -> None:
        if not trainer.ranks.solo:
            raise SaescopeError("the JAX backend is one process that spreads over its JAX devices itself; "
                                "launch it without torchrun")
        super().setup(trainer)
        for m in trainer.members:
            self.reset(m)

    def reset(self, m: Member) -> None:
        """Start the member's JAX state (a fresh optimizer) from its PyTorch SAE's current weights."""
        params, static = from_torch(m.sae)
        self.states[m.name] = (init(self._placed(params), self.optimizer), static)

    def _placed(self, params) -> dict:
        """The parameters where the mode wants them (replicated, or latents split over the mesh)."""
        if self.mesh is None:
            return {k: jnp.asarray(v) for k, v in params.items()}
        split = self.cfg.parallel.mode == "sae"
        layout = {"W_enc": P(None, "d"), "W_dec": P("d", None), "b_enc": P("d"), "theta": P("d"), "log_theta": P("d")}
        return {k: jax.device_put(v, NamedSharding(self.mesh, layout.get(k, P()) if split else P()))
                for k, v in params.items()}

    def _batch(self, x: np.ndarray) -> jax.Array:
        if self.mesh is None:
            return jnp.asarray(x)
        rows = P("d", None) if self.cfg.parallel.mode == "data" else P()
        return jax.device_put(x, NamedSharding(self.mesh, rows))

    def step(self, batch, lr: float) -> None:
        t = self.trainer
        scaled: dict[tuple[str, float], tuple[jnp.ndarray, float]] = {}

        def view(site: str, c: float):
            if (site, c) not in scaled:
                x = self._batch((batch[site] / c).numpy())
                scaled[site, c] = x, ((x - x.mean(0)) ** 2).sum(-1).mean()
            return scaled[site, c]

        for m in t.members:
            x, _ = view(m.site, m.scale)
            y, var = view(m.target, m.scale)
            coeff = float(m.coefficient(t.step, t.coeff_warmup))
            state, static = self.states[m.name]
            dead = jnp.asarray((m.since_fired >= t.dead_tokens).numpy()) if m.sae.objective.dead_aux else None
            scale = 1 / var if self.cfg.loss == "fvu" else 1.0
            state, out = train_step(state, x, y, lr * m.lr_factor, coeff, dead, scale, m.signum_steps, optimizer=self.optimizer,
                                    **static)
            self.states[m.name] = (state, static)
            # the step's numbers on the host in one transfer: the controller and the dead-latent counters need them
            loss, mse, l0, fired, var = jax.device_get((out["loss"], out["mse"], out["l0"], out["fired"], var))
            m.record(t.step, loss=float(loss), mse=float(mse), l0=float(l0), fired=torch.from_numpy(np.array(fired)),
                     var=float(var), coeff=coeff, lr=lr * m.lr_factor, rows=x.shape[0])

    def sync(self, m: Member) -> None:
        """The weights to save: signum's schedule-free average, its decoder rows made unit again."""
        state = self.states[m.name][0]
        to_torch(self.optimizer.average(state.opt, state.params), m.sae)
        if self.cfg.optimizer == "signum":  # Adam's rows are unit after every step already
            m.sae.unit_decoder_rows()

    def state(self, m: Member) -> dict:
        """The optimizer's state as tensors, after the SAE is refreshed (its training point) for saving."""
        state = self.states[m.name][0]
        to_torch(state.params, m.sae)
        return {k: torch.from_numpy(v) for k, v in self.optimizer.tensors(state.opt).items()}

    def load_state(self, m: Member, saved: dict) -> None:
        """The JAX state from the checkpoint (called after the SAE's own weights are loaded)."""
        params, static = from_torch(m.sae)
        params = self._placed(params)
        opt = self.optimizer.from_tensors({k: v.numpy() for k, v in saved.items()}, params, self._placed)
        self.states[m.name] = (State(params, opt), static)
