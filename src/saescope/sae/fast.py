"""Fast paths of the training step, checked against the reference formulas (SPEC §2, written
plainly in jumprelu.py and topk.py) by tests/test_fast.py.

Both encoders take a pre-activation matrix computed once without a graph, and do the backward
by hand: the pre-encoder bias enters the gradient as −W_enc·Σ∂pre (a product with a vector), so
no step ever multiplies for ∂x, which is data.

Dense (`DenseEncode`): the activation is applied in place, the mask is kept as bits, and JumpReLU's
threshold gradient reads only the few entries within ε of θ, so the elementwise work is a handful
of passes over [B, m] beside five products.

Sparse (`SparseEncode` on a `Code`): a trained SAE fires L0 ≪ m latents a token, so of the dense
step's products (about 12·B·d·m FLOPs) only the encoder's forward must be dense. Decoding, the
decoder's gradient, the gradient at the fired latents and the encoder's gradient are all sums
over the B·L0 fired (token, latent) pairs, O(B·L0·d) each. `F.embedding_bag` computes such sums
without building the [pairs, d] product, so one primitive serves all of them:

    x̂[b]        = Σ_{pairs (b, i)}  f · W_dec[i]          (rows of the code, offsets by token)
    ∂W_dec[i]    = Σ_{pairs (b, i)}  f · ∂x̂[b]            (the same pairs grouped by latent)
    ∂W_enc[:, i] = Σ_{pairs (b, i)}  ∂pre · x_in[b]

JumpReLU's threshold gradient also needs ∂f at latents *near* θ that do not fire, so a code may
carry entries whose value is 0; they cost as much as a fired entry and change nothing else."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F

# Above this share of non-zero [batch, m] entries the dense products beat the sparse sums: the
# crossovers bench/train_step.py measures (--kernels dense against sparse at several L0s; the
# README has the table). bfloat16 speeds the products and not the sums, so its crossover is
# lower; accelerators run products relatively faster still, hence the lower bound there.
MAX_DENSITY = {("cpu", None): 0.05, ("cpu", torch.bfloat16): 0.02}
MAX_DENSITY_OTHER = 0.01


def compute_dtype(device: torch.device) -> torch.dtype | None:
    """The products' dtype under autocast (bfloat16 training), None for plain float32."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None


def max_density(device: torch.device) -> float:
    return MAX_DENSITY.get((device.type, compute_dtype(device)), MAX_DENSITY_OTHER)


@dataclass
class Code:
    """Chosen entries of a [batch, width] pre-activation matrix, in row-major order."""

    rows: torch.Tensor      # [n] token of each entry
    cols: torch.Tensor      # [n] latent of each entry
    pre: torch.Tensor       # [n] pre-activation at each entry
    offsets: torch.Tensor   # [batch] first entry of each token (embedding-bag offsets)
    width: int

    @classmethod
    def from_mask(cls, pre: torch.Tensor, mask: torch.Tensor) -> "Code":
        rows, cols = mask.nonzero(as_tuple=True)
        return cls(rows, cols, pre[rows, cols], _offsets(rows, pre.shape[0]), pre.shape[1])

    @classmethod
    def from_topk(cls, vals: torch.Tensor, idx: torch.Tensor, width: int) -> "Code":
        """k entries per token, as `torch.topk` gives them ([batch, k] each)."""
        batch, k = idx.shape
        rows = torch.arange(batch, device=idx.device).repeat_interleave(k)
        offsets = torch.arange(0, batch * k, k, device=idx.device)
        return cls(rows, idx.reshape(-1), vals.reshape(-1), offsets, width)

    @classmethod
    def from_flat(cls, pre: torch.Tensor, flat_idx: torch.Tensor) -> "Code":
        """Entries named by their index in the flattened [batch, width] matrix, any order."""
        flat_idx = flat_idx.sort().values
        rows, cols = flat_idx // pre.shape[1], flat_idx % pre.shape[1]
        return cls(rows, cols, pre.reshape(-1)[flat_idx], _offsets(rows, pre.shape[0]), pre.shape[1])

    def select(self, index: torch.Tensor) -> "Code":
        """The entries at `index` (increasing, so still in token order)."""
        rows = self.rows[index]
        return Code(rows, self.cols[index], self.pre[index], _offsets(rows, len(self.offsets)), self.width)

    def latents(self, lo: int, hi: int) -> "Code":
        """The entries of latents lo ≤ i < hi, as a code of that slice (latent i becomes i − lo)."""
        inside = ((self.cols >= lo) & (self.cols < hi)).nonzero().squeeze(1)
        c = self.select(inside)
        return Code(c.rows, c.cols - lo, c.pre, c.offsets, hi - lo)

    @cached_property
    def by_latent(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(order of the entries grouped by latent, offsets of each latent's group): the layout of
        the per-latent sums of the backward pass."""
        order = torch.argsort(self.cols, stable=True)
        return order, _offsets(self.cols[order], self.width)

    def decode(self, vals: torch.Tensor, W_dec: torch.Tensor) -> torch.Tensor:
        """Σ over each token's entries of vals · W_dec[latent] → [batch, d_out]; differentiable in
        both (torch's embedding-bag backward gives ∂vals and the dense ∂W_dec)."""
        return F.embedding_bag(self.cols, W_dec, self.offsets, mode="sum", per_sample_weights=vals)

    def per_latent_sum(self, weights: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Σ over each latent's entries of weights · table[token] → [width, table width]."""
        order, offsets = self.by_latent
        return F.embedding_bag(self.rows[order], table, offsets, mode="sum", per_sample_weights=weights[order])

    def fired(self, vals: torch.Tensor) -> torch.Tensor:
        """[width] bool: latents with a non-zero value at some token (a count, not a boolean
        index, so no host sync)."""
        counts = torch.zeros(self.width, dtype=vals.dtype, device=vals.device)
        return counts.index_add_(0, self.cols, (vals.detach() != 0).to(vals.dtype)) > 0


def _offsets(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(sorted_ids, minlength=n)
    return torch.cumsum(counts, 0) - counts


class Workspace:
    """Buffers reused by steps that run one after another (the trainer's SAEs, step after step).
    A fresh [batch, m] tensor is fresh memory, and touching it page-faults on every step (a
    product or a comparison into new memory is measurably slower than into a reused buffer,
    most of all for the cheap elementwise passes). A buffer handed out again is overwritten, so
    a graph still holding the last one must have run its backward first (autograd's version check
    raises otherwise)."""

    def __init__(self):
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, tuple(shape), dtype, device)
        if key not in self._buffers:
            self._buffers[key] = torch.empty(shape, dtype=dtype, device=device)
        return self._buffers[key]


def buffer(workspace: Workspace | None, name: str, shape, dtype: torch.dtype, device: torch.device):
    """A workspace's buffer, or None (an op's `out=None`: fresh memory) without one."""
    return workspace.get(name, shape, dtype, device) if workspace is not None else None


def product(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b, multiplied in `dtype` when one is given (the operands are cast; the master weights
    stay float32) and returned in float32, where thresholds are compared and gradients summed."""
    if dtype is None:
        return torch.mm(a, b, out=out)
    with torch.autocast(a.device.type, enabled=False):
        low = torch.mm(a.to(dtype), b.to(dtype))
    return low.float() if out is None else out.copy_(low)


def pre_activations(x: torch.Tensor, b_pre: torch.Tensor | None, W_enc: torch.Tensor, b_enc: torch.Tensor,
                    workspace: Workspace | None = None) -> torch.Tensor:
    """(x − b_pre) @ W_enc + b_enc without a graph: the one dense product of the sparse step.
    The product, then the bias, as the reference computes them, so both see the same bits (a
    fused addmm rounds differently, and an entry at the edge of θ's ε-window may flip)."""
    with torch.no_grad():
        out = buffer(workspace, "pre", (x.shape[0], W_enc.shape[1]), torch.float32, x.device)
        return product(x if b_pre is None else x - b_pre, W_enc, compute_dtype(x.device), out).add_(b_enc)


def above(pre: torch.Tensor, threshold: torch.Tensor, workspace: Workspace | None = None) -> torch.Tensor:
    """pre > threshold as a bool matrix, in a reused buffer when there is a workspace."""
    return torch.gt(pre, threshold, out=buffer(workspace, "mask", pre.shape, torch.bool, pre.device))


def _theta_terms(theta: torch.Tensor, near: Code, g_vals: torch.Tensor, g_count: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """θ's pseudo-derivative (SPEC §2) at each entry of a code, −(θ/ε)·K·∂f − (1/ε)·K·∂H, given
    ∂f (∂vals) and ∂H (the firing indicator's gradient, from the counts) there. With the input
    STE the pre-activation gets its negative (∂H/∂z := K/ε, so ∂f/∂z := H + θ·K/ε)."""
    th = theta[near.cols]
    u = (near.pre - th) / eps
    kernel = ((u > -0.5) & (u < 0.5)).to(g_vals.dtype)
    return g_vals * -(th / eps) * kernel + g_count * -(1.0 / eps) * kernel


def _indicator_grad(near: Code, g_count: torch.Tensor | None, g_tokens: torch.Tensor | None,
                    g_latents: torch.Tensor | None):
    """∂H at each entry of a code, from the gradients of the counts the loss read: the total (a
    scalar, broadcast), per token and per latent."""
    g = g_count if g_count is not None else 0.0
    if g_tokens is not None:
        g = g + g_tokens[near.rows]
    if g_latents is not None:
        g = g + g_latents[near.cols]
    return g


def _counts(rows: torch.Tensor, cols: torch.Tensor, on: torch.Tensor, batch: int, width: int, per_token: bool,
            per_latent: bool):
    """Firings of the entries that are `on`: in all, per token [batch] and per latent [width] (each
    of the last two None unless asked for)."""
    on = on.to(torch.float32)
    tokens = torch.zeros(batch, device=on.device).index_add_(0, rows, on) if per_token else None
    latents = torch.zeros(width, device=on.device).index_add_(0, cols, on) if per_latent else None
    return on.sum(), tokens, latents


class SparseEncode(torch.autograd.Function):
    """The values of a code's entries and the firings per token and per latent, with the
    gradients of the dense encoder restricted to those entries.

    Inputs: x [B, d], b_pre [d] or None (the pre-encoder bias: pre = (x − b_pre) W_enc + b_enc),
    W_enc, b_enc, θ [m] or None (JumpReLU; None: ReLU), the code, ε, whether the kernel's
    gradient reaches the input (the input STE), and which counts beyond the total are wanted.
    Outputs: vals [n] = pre · H(pre − θ) and the counts Σ H(pre − θ), Σ_i H(pre − θ) [B] and
    Σ_b H(pre − θ) [m] (the last two None unless asked for): every sparsity and frequency
    penalty is a function of them. Gradients follow SPEC §2: ∂vals/∂pre = H, ∂vals/∂θ := −(θ/ε)·K,
    ∂H/∂θ := −(1/ε)·K, nothing from the counts to pre unless the input STE is on. Entries the
    code does not hold must have zero H and zero K (the caller picks a superset of both)."""

    @staticmethod
    def forward(ctx, x, b_pre, W_enc, b_enc, theta, code: Code, eps: float, input_ste: bool = False,
                per_token: bool = False, per_latent: bool = False):
        active = code.pre > (theta[code.cols] if theta is not None else 0.0)
        vals = code.pre * active
        x_in = x if b_pre is None else x - b_pre
        ctx.save_for_backward(x_in, W_enc, theta, active)
        ctx.code, ctx.eps, ctx.input_ste = code, eps, input_ste
        return vals, *_counts(code.rows, code.cols, active, x.shape[0], code.width, per_token, per_latent)

    @staticmethod
    def backward(ctx, g_vals, g_count, g_tokens, g_latents):
        x_in, W_enc, theta, active = ctx.saved_tensors
        code = ctx.code
        need_x, need_b_pre, need_W, need_b, need_theta = ctx.needs_input_grad[:5]
        g_pre = g_vals * active
        g_x = g_b_pre = g_W = g_b = g_theta = None
        if theta is not None and (need_theta or ctx.input_ste):
            terms = _theta_terms(theta, code, g_vals, _indicator_grad(code, g_count, g_tokens, g_latents), ctx.eps)
            if need_theta:
                g_theta = torch.zeros_like(theta).index_add_(0, code.cols, terms)
            if ctx.input_ste:
                g_pre = g_pre - terms
        if need_W:
            g_W = code.per_latent_sum(g_pre, x_in).t()
        if need_b or need_b_pre:
            g_b = torch.zeros(code.width, dtype=g_pre.dtype, device=g_pre.device).index_add_(0, code.cols, g_pre)
            if need_b_pre:
                g_b_pre = -(W_enc @ g_b)
        if need_x:
            g_x = code.decode(g_pre, W_enc.t().contiguous())
        return g_x, g_b_pre, g_W, g_b if need_b else None, g_theta, None, None, None, None, None


class DenseEncode(torch.autograd.Function):
    """`SparseEncode` on every entry: the same inputs and gradients, with `pre` (the graph-free
    pre-activations, overwritten by the output) in place of a code. Outputs f [B, m] and the
    counts. `candidates` (pre > θ − ε, when the caller has it) and the
    workspace save [B, m] passes."""

    @staticmethod
    def forward(ctx, x, b_pre, W_enc, b_enc, theta, pre, eps: float, workspace: Workspace | None = None,
                candidates: torch.Tensor | None = None, input_ste: bool = False, per_token: bool = False,
                per_latent: bool = False):
        def mask(name):
            return buffer(workspace, name, pre.shape, torch.bool, pre.device)

        th = theta if theta is not None else pre.new_zeros(())
        near = None
        if theta is not None and (ctx.needs_input_grad[4] or input_ste):  # a superset of K's support, exact K later
            lo = candidates if candidates is not None else torch.gt(pre, th - eps, out=mask("mask"))
            near = Code.from_mask(pre, lo.logical_and_(torch.lt(pre, th + eps, out=mask("mask2"))))
        off = torch.le(pre, th, out=mask("off"))
        batch, width = off.shape  # reductions of a bool matrix along a dimension are slow: only when asked
        count = (off.numel() - off.count_nonzero()).to(pre.dtype)
        tokens = width - off.sum(1, dtype=torch.float32) if per_token else None
        latents = batch - off.sum(0, dtype=torch.float32) if per_latent else None
        f = pre.masked_fill_(off, 0.0)
        ctx.mark_dirty(pre)
        x_in = x if b_pre is None else x - b_pre
        ctx.save_for_backward(x_in, W_enc, theta, off)
        ctx.near, ctx.eps, ctx.dtype, ctx.input_ste = near, eps, compute_dtype(x.device), input_ste
        return f, count, tokens, latents

    @staticmethod
    def backward(ctx, g_f, g_count, g_tokens, g_latents):
        x_in, W_enc, theta, off = ctx.saved_tensors
        need_x, need_b_pre, need_W, need_b, need_theta = ctx.needs_input_grad[:5]
        near = ctx.near
        terms = None
        if near is not None:  # read ∂f there before the mask zeroes it
            terms = _theta_terms(theta, near, g_f[near.rows, near.cols], _indicator_grad(near, g_count, g_tokens, g_latents),
                                 ctx.eps)
        # in place: this gradient is ours alone (it comes from the decoder's product)
        g_pre = (g_f if g_f.is_contiguous() else g_f.contiguous()).masked_fill_(off, 0.0)
        if terms is not None and ctx.input_ste:
            g_pre.index_put_((near.rows, near.cols), -terms, accumulate=True)
        g_x = g_b_pre = g_W = g_b = g_theta = None
        if need_W:  # latent-major, the parameter's layout (see SparseAutoencoder)
            g_W = product(g_pre.t(), x_in, ctx.dtype).t()
        if need_b or need_b_pre:
            g_b = g_pre.sum(0)
            if need_b_pre:
                g_b_pre = -(W_enc @ g_b)
        if need_x:
            g_x = product(g_pre, W_enc.t(), ctx.dtype)
        if terms is not None and need_theta:
            g_theta = torch.zeros_like(theta).index_add_(0, near.cols, terms)
        return g_x, g_b_pre, g_W, g_b if need_b else None, g_theta, None, None, None, None, None, None, None


def few_touched(out: dict) -> torch.Tensor | None:
    """The latents a step's gradient reached (`out` from a `training_loss`), when at most a
    quarter were (else None); kept in `out`, so the all-reduce and the decoder-norm step read the
    mask once."""
    if "few_touched" not in out:
        touched = out.get("touched", out["fired"])
        out["few_touched"] = (touched.nonzero().squeeze(1) if int(touched.count_nonzero()) <= touched.numel() // 4
                              else None)
    return out["few_touched"]
