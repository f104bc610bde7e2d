"""What a training backend does for the trainer (`Backend`), and the record of one SAE of the suite
that both sides share (`Member`).

The trainer owns the data, the suite, schedules, metrics and checkpoints; a backend owns how a
step is computed and what optimizer state that needs. A backend is a module of its own
(step_torch.py, jax/backend.py), chosen by `launch.train`, so the trainer imports neither."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..sae import SparseAutoencoder
from ..sae.multilayer import MultiLayerDictionary
from .schedule import TargetL0, coeff_at


# Signum: the parameters in activation units, by name, with the scale of the first batch their step
# is measured in and a factor (`Member.signum_steps` holds the products); the rest (unit-norm rows,
# log θ) step lr itself. Scales (trainer.py: `_signum_steps`):
# - "coordinate": the median over coordinates of a centred coordinate's RMS. b_dec sits among the
#   input's coordinates, most of which are small beside the few massive dims of models like Gemma;
#   stepped by the mean-square scale, which those dims set, it swept the ordinary coordinates'
#   whole range every few steps, and the dictionaries did worse on unfamiliar text (README). Even
#   a median coordinate's step is too much: where the mean error is near zero its gradient's sign
#   is noise, so b_dec random-walks, and the walk grows with the run. The constant offset it leaves
#   is a small share of the squared error but costs the model far more than the rest of the error
#   (it is the same on every token, so attention does not average it away), mostly in the input's
#   low-variance directions. b_dec therefore steps a small fraction of that scale (README:
#   Optimizer and learning rate; sparsify's raw-unit step is smaller still, near frozen).
# - "pre": the RMS of a centred coordinate, about a pre-activation's spread at initialisation. θ steps
#   ten: the encoder's sign steps move a latent's pre-activations by about lr × that × d_in a step,
#   so a θ that moved one (as b_enc does) stayed where it started while they swept past it, and the
#   sparsity penalty, which reaches θ alone, could not hold L0. Both factors were measured (README:
#   Optimizer and learning rate).
# - "inverse_width": 1/d_in, for a skip transcoder's W_skip (d_in × d_out, dense): a sign step on all
#   of it moves each output coordinate by about lr × Σ_d |x_d|, d_in times what one entry does; it
#   starts at the least-squares map (trainer.py), so its steps only refine it.
SIGNUM_UNITS = {"b_enc": ("pre", 1.0), "b_dec": ("coordinate", 0.005), "theta": ("pre", 10.0),
                "W_skip": ("inverse_width", 1.0)}


@dataclass
class Member:
    """One SAE of the suite with its schedule and counters. Per-step state stays in tensors; the
    host reads it only when it logs or checkpoints."""

    name: str
    sae: SparseAutoencoder | MultiLayerDictionary
    site: str
    target: str
    scale: float                # C: the SAE sees activations / C
    coeff: float                # λ after warm-up (unused under a target-L0 controller)
    since_fired: torch.Tensor   # tokens since each latent last fired
    controller: TargetL0 | None = None
    lr_factor: float = 1.0      # this SAE's lr over the configured one (lr_scale)
    signum_steps: dict = field(default_factory=dict)  # signum: a parameter's step per unit of lr (else 1)
    sums: dict = field(default_factory=dict)  # metrics accumulated since the last log line
    steps: int = 0                            # steps in `sums`
    bad_step: torch.Tensor | None = None     # first step with a non-finite loss (−1: none)
    bad_loss: torch.Tensor | None = None
    l0_from: list[float] | None = None       # a multi-layer dictionary started from single-layer ones: their L0s,
    l0_decay: int = 0                        # from which each group's k or target falls over this many steps

    @property
    def multi(self) -> bool:
        """A cross-layer transcoder or crosscoder: it reads and writes several sites, each
        normalised by the dictionary's own scales (`scale` is 1)."""
        return isinstance(self.sae, MultiLayerDictionary)

    @cached_property
    def scales_in(self) -> list[float]:
        return self.sae.scale_in.tolist()

    @cached_property
    def scales_out(self) -> list[float]:
        return self.sae.scale_out.tolist()

    def coefficient(self, step: int, warmup: int):
        """The sparsity coefficient of this step: the controller's, or λ on its warm-up."""
        return self.controller.coeff if self.controller else coeff_at(step, self.coeff, warmup)

    def record(self, step: int, *, loss, mse, l0, fired: torch.Tensor, var, coeff, lr: float, rows: int) -> None:
        """A step's outcome: the first non-finite loss, the dead-latent counters (`rows` tokens
        seen), the controller, and the sums the next metrics line averages."""
        loss, mse, l0 = (torch.as_tensor(v) for v in (loss, mse, l0))
        bad = ~torch.isfinite(loss) & (self.bad_step < 0)
        self.bad_step = torch.where(bad, step, self.bad_step)
        self.bad_loss = torch.where(bad, loss.to(self.bad_loss), self.bad_loss)
        self.since_fired.add_(rows).masked_fill_(fired.to(self.since_fired.device), 0)
        if self.controller:
            self.controller.update(l0)
        for key, value in (("loss", loss), ("mse", mse), ("l0", l0), ("fvu", mse / var), ("lambda", coeff), ("lr", lr)):
            self.sums[key] = self.sums.get(key, 0.0) + value
        self.steps += 1


class Backend(ABC):
    """How every SAE of a suite takes its step. `setup` is called once the trainer has built its
    members (and before a checkpoint is loaded into them)."""

    trainer = None

    def setup(self, trainer) -> None:
        self.trainer = trainer

    @abstractmethod
    def step(self, batch: dict[str, torch.Tensor], lr: float) -> None:
        """One step of every member on `batch` (raw activations by site), recorded in each member."""

    @abstractmethod
    def state(self, m: Member) -> dict:
        """The optimizer state of a member, tensors only (checkpoints load with weights_only);
        afterwards `m.sae` holds the member's current weights."""

    @abstractmethod
    def load_state(self, m: Member, saved: dict) -> None:
        """Restore what `state` gave, after `m.sae` has been loaded from the same checkpoint."""

    def sync(self, m: Member) -> None:
        """Make `m.sae` hold the weights to save once training is over (a backend that keeps its
        own copy; an optimizer whose result is an average)."""
