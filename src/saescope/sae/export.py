"""`saescope export`: a run's dictionaries written in the layouts other tools read, each under
the name that layout gives it."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from ..errors import SaescopeError
from ..site import Site, layers_label
from .base import SparseAutoencoder
from .circuit_tracer import check_circuit_tracer, is_circuit_tracer, load_circuit_tracer, save_circuit_tracer
from .formats import gemmascope2_dir, load_dictionary, run_saes, save_dictionary, save_sae, unfit, width_label
from .multilayer import MultiLayerDictionary

EXPORTS = ("gemmascope2", "saelens", "circuit-tracer")


def transcoder_sets(saes: dict[str, SparseAutoencoder]) -> dict[str, list[str]]:
    """Transcoders of one entry at two or more layers (names equal past their site, "mlp_in.L-…"):
    what stands in for every MLP of those layers at once, named by its layers and that rest."""
    by_rest: dict[str, list[str]] = {}
    for name, sae in saes.items():
        site = sae.cfg.site or ""
        if sae.cfg.transcoder and name.startswith(site + "-"):
            by_rest.setdefault(name[len(site) + 1:], []).append(name)
    out = {}
    for rest, names in by_rest.items():
        if len(names) > 1:
            names = sorted(names, key=lambda n: Site.parse(saes[n].cfg.site).layer)
            out[f"{layers_label(tuple(saes[n].cfg.site for n in names))}-{rest}"] = names
    return out


def _l0(name: str, cfg) -> float:
    l0 = cfg.extra.get("target_l0") or cfg.extra.get("final_metrics", {}).get("l0")
    if l0 is None:
        raise SaescopeError(f"{name}: Gemma Scope 2 names a folder by its L0, and this dictionary records neither "
                            "a target nor a training L0")
    return l0


def export_saes(folder: str | os.PathLike, out: str | os.PathLike, format: str) -> list[Path]:
    """Every dictionary of `folder` (a run, a folder of dictionaries, or one) saved under `out`:
    Gemma Scope 2's tree (a folder name carries the target L0, else the L0 measured in training;
    multi-layer dictionaries under clt/ and crosscoder/), one SAELens folder per SAE by its name,
    or circuit-tracer's folders, one per cross-layer transcoder and per transcoder set covering
    layers 0…L−1. A dictionary the format cannot hold stops the export before anything is written."""
    if format not in EXPORTS:
        raise SaescopeError(f"unknown export format '{format}'; available: {', '.join(EXPORTS)}")
    found = {name: load_dictionary(path) for name, path in run_saes(folder).items()}
    if format == "circuit-tracer":
        return _circuit_tracer(found, Path(out))
    dests = {}
    for name, d in found.items():
        if isinstance(d, MultiLayerDictionary):
            if format == "saelens" or d.cfg.arch == "topk":
                raise SaescopeError(f"{name}: a {d.cfg.arch} {d.cfg.kind} has no {format} layout; export it as native "
                                    "(its training folder) or, a JumpReLU one, as gemmascope2")
            dests[name] = Path(out) / d.cfg.kind / f"width_{width_label(d.cfg.d_sae)}_l0_{round(_l0(name, d.cfg))}"
            continue
        reason = unfit(d.cfg, format)
        if reason:
            raise SaescopeError(f"{name}: {reason}")
        dests[name] = Path(out) / name if format == "saelens" else gemmascope2_dir(out, d.cfg, _l0(name, d.cfg))
    clash = sorted(str(d) for d, n in Counter(dests.values()).items() if n > 1)
    if clash:
        raise SaescopeError(f"two dictionaries would share the folder {clash[0]} (same kind, layer, width and L0); "
                            "export them apart")
    return [save_dictionary(d, dests[name]) if isinstance(d, MultiLayerDictionary) else save_sae(d, dests[name], format=format)
            for name, d in found.items()]


def replacement_units(folder: str | os.PathLike) -> dict[str, MultiLayerDictionary | list[SparseAutoencoder]]:
    """What can stand in for a model's MLPs, by name: each cross-layer transcoder and each
    transcoder set of `folder` (a run, a folder of dictionaries, one, or a circuit-tracer folder)."""
    if is_circuit_tracer(folder):
        return {Path(folder).name: load_circuit_tracer(folder)}
    return _units({name: load_dictionary(path) for name, path in run_saes(folder).items()}, f"in {folder}")


def _units(found: dict, where: str) -> dict[str, MultiLayerDictionary | list[SparseAutoencoder]]:
    """The CLTs and transcoder sets among loaded dictionaries; crosscoders, SAEs and transcoders
    without a set are not units, and are named in the error when nothing else is there."""
    clts = {name: d for name, d in found.items() if isinstance(d, MultiLayerDictionary) and d.cfg.kind == "clt"}
    singles = {name: d for name, d in found.items() if not isinstance(d, MultiLayerDictionary)}
    sets = transcoder_sets(singles)
    if not clts and not sets:
        raise SaescopeError("cross-layer transcoders or transcoder sets (the same transcoder entry at every layer) "
                            f"stand in for MLPs; none among {', '.join(found) or 'nothing'} {where}")
    return {**clts, **{name: [singles[n] for n in names] for name, names in sets.items()}}


def _circuit_tracer(found: dict, out: Path) -> list[Path]:
    """Each CLT and transcoder set as a circuit-tracer folder."""
    units = _units(found, "to export")
    for d in units.values():  # every check before anything is written
        check_circuit_tracer(d)
    return [save_circuit_tracer(d, out / name, scan=name) for name, d in units.items()]


def pick_unit(folder: str, name: str | None):
    """The CLT or transcoder set of `folder` to trace through, by name when there are several."""
    units = replacement_units(folder)
    if name is not None:
        if name not in units:
            raise SaescopeError(f"no CLT or transcoder set named {name!r} in {folder}; there: {', '.join(units)}")
        return name, units[name]
    if len(units) > 1:
        raise SaescopeError(f"{folder} holds {len(units)} CLTs and transcoder sets ({', '.join(units)}): choose one with --set")
    return next(iter(units.items()))


def member(unit_name: str, sites: list[str], layer: int) -> str:
    """The name of layer `layer`'s dictionary in a unit read at `sites` (a run's transcoder, or a
    CLT's latents of that layer as the explorer lists them): a unit named "<its layers>-<rest>"
    holds "mlp_in.L-<rest>"."""
    return f"mlp_in.{layer}-{unit_name.removeprefix(layers_label(tuple(sites)) + '-')}"
