"""Feature absorption on first letters (label-free, SAEBench's two scores from "A is for Absorption").

Labels come from the tokenizer itself: whole-word tokens and their first letter. A linear probe
learns "starts with letter ℓ" from the model's activations at the site; for each letter the SAE's
main latents are the few whose firing best detects it (k-sparse selection, k grown while F1
improves). Over the held-out words whose letter the probe gets right:
- full absorption (the headline rate): the main latents are silent, and the latent with the largest
  projection of its reconstruction onto the probe direction is aligned with it (decoder cosine
  above a threshold) and makes up at least `share` of the activation's own projection;
- absorption fraction: the part of the activation's projection that the main latents leave and up
  to `max_absorbers` other aligned latents supply instead, as a share of what all of them supply
  (partial absorption counts too).
The thresholds are SAEBench's, so the numbers compare with its published ones; a latent's
projection is its activation times its decoder row's component along the probe (SAEBench's
activation × cosine when decoder rows have unit norm)."""

from __future__ import annotations

import random
import string

import torch
import torch.nn.functional as F

from ..errors import SaescopeError
from ..lm import LanguageModel, capture
from ..sae import SparseAutoencoder

LETTERS = string.ascii_lowercase
ICL_PREFIX = "tartan has the first letter: T. mirror has the first letter: M. "


def word_tokens(tokenizer, min_per_letter: int = 8, max_per_letter: int = 80, seed: int = 0) -> list[tuple[int, str]]:
    """(token id, letter) for whole-word vocabulary tokens like ' apple' (leading space, letters only)."""
    by_letter: dict[str, list[int]] = {c: [] for c in LETTERS}
    for token, idx in tokenizer.get_vocab().items():
        text = tokenizer.convert_tokens_to_string([token])
        if len(text) >= 4 and text[0] == " " and text[1:].isascii() and text[1:].isalpha() and text[1:].islower():
            by_letter[text[1]].append(idx)
    rng = random.Random(seed)
    out = []
    for letter, ids in by_letter.items():
        if len(ids) >= min_per_letter:
            ids = sorted(ids)
            rng.shuffle(ids)
            out += [(i, letter) for i in ids[:max_per_letter]]
    if len({c for _, c in out}) < 2:
        raise SaescopeError("the tokenizer has too few whole-word tokens for the first-letter absorption test")
    return out


def word_activations(lm: LanguageModel, site: str, words: list[tuple[int, str]], batch_size: int = 64) -> torch.Tensor:
    """The site's activation at each word token, placed after a short in-context spelling prefix."""
    prefix = lm.tokenizer(ICL_PREFIX, add_special_tokens=False)["input_ids"]
    bos = lm.tokenizer.bos_token_id if lm.tokenizer.bos_token_id is not None else lm.tokenizer.eos_token_id
    rows = torch.tensor([[bos, *prefix, w] for w, _ in words])
    out = [capture(lm, rows[i:i + batch_size], site)[site][:, -1].float().cpu() for i in range(0, len(rows), batch_size)]
    return torch.cat(out)


def _probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression on standardised inputs, full-batch L-BFGS."""
    probe = torch.nn.Linear(x.shape[1], n_classes)
    opt = torch.optim.LBFGS(probe.parameters(), max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(probe(x), y) + 1e-3 * probe.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return probe


def _f1(pred: torch.Tensor, truth: torch.Tensor) -> float:
    tp = float((pred & truth).sum())
    return 2 * tp / max(float(pred.sum() + truth.sum()), 1.0)


def absorption(sae: SparseAutoencoder, lm: LanguageModel, site: str | None = None, *, seed: int = 0,
               max_per_letter: int = 80, **kw) -> dict:
    """First-letter absorption of `sae` at its site: the headline rate and per-letter detail."""
    words = word_tokens(lm.tokenizer, max_per_letter=max_per_letter, seed=seed)
    x = word_activations(lm, site or sae.cfg.site, words)
    return absorption_from_activations(sae, x, [c for _, c in words], seed=seed, **kw)


def _f1_all(fired: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """F1 of each column of `fired` [n, m] as a detector of `truth` [n]."""
    tp = (fired & truth[:, None]).sum(0).float()
    return 2 * tp / (fired.sum(0) + truth.sum()).clamp_min(1).float()


def absorption_from_activations(sae: SparseAutoencoder, x: torch.Tensor, labels: list[str], *,
                                cos_threshold: float = 0.025, fraction_cos_threshold: float = 0.1,
                                share: float = 0.4, max_absorbers: int = 3, max_main: int = 3,
                                f1_gain: float = 0.03, seed: int = 0) -> dict:
    """The metric on given word activations x [n, d_in] and their first letters."""
    letters = sorted(set(labels))
    y = torch.tensor([letters.index(c) for c in labels])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    split = int(0.7 * len(labels))
    train, test = perm[:split], perm[split:]
    mu, sd = x[train].mean(0), x[train].std(0).clamp_min(1e-6)
    probe = _probe((x[train] - mu) / sd, y[train], len(letters))
    with torch.no_grad():
        predicted = probe((x[test] - mu) / sd).argmax(-1)
        acts = sae.encode(x.to(sae.W_enc.device)).cpu().float()
        fired = acts > 0
        directions = F.normalize(probe.weight / sd, dim=1)  # probe directions in raw activation space
        dec = sae.W_dec.detach().cpu().float()
        along = dec @ directions.T                       # [d_sae, letters]: each latent's unit write along each probe
        cos = F.normalize(dec, dim=1) @ directions.T
        x_along = x.float() @ directions.T               # [n, letters]: the activation's own projection
    per_letter, full, fractions = {}, 0, []
    for li, letter in enumerate(letters):
        truth = y[train] == li
        # main latents: grow a k-sparse "any of these fires" detector while F1 improves enough
        main, best = [], 0.0
        for j in _f1_all(fired[train], truth).argsort(descending=True)[:4 * max_main].tolist():
            score = _f1(fired[train][:, main + [j]].any(1), truth)
            if score > best + (f1_gain if main else 0.0):
                main, best = main + [j], score
            if len(main) == max_main:
                break
        rows = test[(y[test] == li) & (predicted == li)]
        contrib = acts[rows] * along[:, li][None]        # each latent's share of the reconstruction along the probe
        total = x_along[rows, li]
        silent = ~fired[rows][:, main].any(1) if main else torch.ones(len(rows), dtype=torch.bool)
        # full absorption: the main latents are silent and the top-projecting latent, aligned with the
        # letter, makes up `share` of the activation's projection (a low cosine alone is met by chance)
        top_val, top_idx = contrib.max(1)
        is_full = silent & (cos[top_idx, li] >= cos_threshold) & (total > 0) & (top_val >= share * total)
        # absorption fraction: the part of the projection the main latents leave that up to
        # `max_absorbers` other aligned latents supply instead
        main_part = contrib[:, main].sum(1) if main else torch.zeros(len(rows))
        others = contrib.clone()
        others[:, main] = 0
        others[:, cos[:, li] < fraction_cos_threshold] = 0
        absorbers = others.clamp_min(0).topk(min(max_absorbers, others.shape[1]), dim=1).values.sum(1)
        taken = torch.minimum(absorbers, total - main_part)
        frac = (taken / (taken + main_part)).clamp(0, 1)
        frac = torch.where(main_part <= 0, torch.ones_like(frac), frac)
        frac = torch.where((main_part >= total) | (absorbers < share * total), torch.zeros_like(frac), frac)
        full += int(is_full.sum())
        fractions.append(frac)
        per_letter[letter] = {"main_latents": main, "main_f1": best, "test_words": len(rows),
                              "missed_by_main": int(silent.sum()), "absorbed": int(is_full.sum()),
                              "absorption_fraction": float(frac.mean()) if len(rows) else 0.0}
    fractions = torch.cat(fractions)
    return {"absorption_rate": full / max(len(fractions), 1),
            "absorption_fraction": float(fractions.mean()) if len(fractions) else 0.0,
            "probe_accuracy": float((predicted == y[test]).float().mean()),
            "n_words": len(labels), "letters": per_letter, "cos_threshold": cos_threshold,
            "fraction_cos_threshold": fraction_cos_threshold, "share": share}
