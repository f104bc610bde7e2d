"""`saescope export`: a run's dictionaries written in the layouts other tools read, each under
the name that layout gives it."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import SaescopeError
from .formats import gemmascope2_dir, load_sae, run_saes, save_sae, unfit

EXPORTS = ("gemmascope2", "saelens")


def export_saes(folder: str | os.PathLike, out: str | os.PathLike, format: str) -> list[Path]:
    """Every SAE of `folder` (a run, a folder of SAEs, or one SAE) saved under `out`: Gemma Scope
    2's tree (its folder name carries the target L0, else the L0 measured in training), or one
    SAELens folder per SAE, by its name. An SAE the format cannot hold stops the export before
    anything is written."""
    if format not in EXPORTS:
        raise SaescopeError(f"unknown export format '{format}'; available: {', '.join(EXPORTS)}")
    saes = {name: load_sae(path) for name, path in run_saes(folder).items()}
    dests = {}
    for name, sae in saes.items():
        reason = unfit(sae.cfg, format)
        if reason:
            raise SaescopeError(f"{name}: {reason}")
        if format == "saelens":
            dests[name] = Path(out) / name
            continue
        l0 = sae.cfg.extra.get("target_l0") or sae.cfg.extra.get("final_metrics", {}).get("l0")
        if l0 is None:
            raise SaescopeError(f"{name}: Gemma Scope 2 names a folder by its L0, and this SAE records neither a target nor a training L0")
        dests[name] = gemmascope2_dir(out, sae.cfg, l0)
    clash = sorted(str(d) for d, n in Counter(dests.values()).items() if n > 1)
    if clash:
        raise SaescopeError(f"two SAEs would share the folder {clash[0]} (same kind, layer, width and L0); export them apart")
    return [save_sae(sae, dests[name], format=format) for name, sae in saes.items()]
