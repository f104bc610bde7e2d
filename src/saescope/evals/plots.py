"""The report's pictures (PNG): the Pareto view, firing-frequency histograms, loss by position."""

from __future__ import annotations

import io
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter  # noqa: E402

from ..files import atomic_write  # noqa: E402


def _save(fig, out: Path) -> Path:
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out, buf.getvalue())
    return out


def _family(r: dict) -> str:
    kind = r["arch"] + (" transcoder" if r.get("target_site") else "")
    return f"{r['site']} {kind} {r['d_sae']}"


def _finite(value) -> float:
    return value if isinstance(value, float) and value == value else 0.0


def pareto(records: list[dict], out: Path, title: str | None = None) -> Path:
    """Delta LM loss and FVU against L0, one line per site × architecture × width."""
    groups = defaultdict(list)
    for r in records:
        groups[_family(r)].append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for label, rs in sorted(groups.items()):
        rs = sorted(rs, key=lambda r: r["l0"])
        l0 = [r["l0"] for r in rs]
        axes[0].errorbar(l0, [r["delta_loss"] for r in rs], yerr=[_finite(r.get("delta_loss_se")) for r in rs],
                         fmt="o-", capsize=3, label=label)
        axes[1].plot(l0, [r["fvu"] for r in rs], "o-", label=label)
    for ax, name in zip(axes, ("delta LM loss (nats)", "FVU")):
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("L0 (active latents per token)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].set_title("delta loss vs L0 (± per-sequence SE; lower left is better)")
    axes[1].set_title("FVU vs L0")
    axes[1].legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return _save(fig, out)


def frequency_histograms(records: list[dict], out: Path) -> Path:
    """log10 firing frequency of each SAE's live latents; dead ones are counted in the legend."""
    fig, ax = plt.subplots(figsize=(7, 4))
    bins = np.linspace(-6, 0, 49)
    for r in records:
        f = np.asarray(r["firing_frequency"])
        live = f[f > 0]
        ax.hist(np.log10(live), bins=bins, histtype="step",
                label=f"{r['sae']} ({int((f == 0).sum())} dead)")
    ax.axvline(-1, color="grey", ls="--", lw=1)
    ax.set_xlabel("log10 firing frequency (dashed: 10%, dense above)")
    ax.set_ylabel("latents")
    ax.set_yscale("log")
    ax.legend(fontsize=6)
    return _save(fig, out)


def by_position(records: list[dict], out: Path) -> Path:
    """Reconstruction loss (share of variance) against token position."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in records:
        curve = np.asarray(r["recon_loss_by_position"])
        ax.plot(np.arange(1, len(curve)), curve[1:], lw=1, label=r["sae"])  # position 0 is BOS
    ax.set_xscale("log")
    ax.set_xlabel("token position")
    ax.set_ylabel("reconstruction loss / variance")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    return _save(fig, out)
