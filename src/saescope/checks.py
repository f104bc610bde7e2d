"""Whether an SAE fits a model: its site exists there and its widths match the site's."""

from __future__ import annotations

from .errors import SaescopeError
from .lm import LanguageModel
from .sae import SparseAutoencoder
from .site import Site


def check_sae(sae: SparseAutoencoder, lm: LanguageModel) -> Site:
    """The site `sae` reads in `lm`, or a one-line error."""
    cfg = sae.cfg
    if cfg.site is None:
        raise SaescopeError("the SAE does not say which site it reads; give it when loading (load_sae(path, "
                            "site='resid.6'), --site resid.6)")
    where = Site.parse(cfg.site).check(lm)
    if where.width(lm) != cfg.d_in:
        raise SaescopeError(f"SAE d_in {cfg.d_in} does not match {where} of {lm.name}, which is {where.width(lm)} wide")
    if cfg.transcoder:
        target = Site.parse(cfg.target_site).check(lm)
        if target.width(lm) != cfg.width_out:
            raise SaescopeError(f"transcoder output {cfg.width_out} does not match {target} of {lm.name} ({target.width(lm)} wide)")
    return where
