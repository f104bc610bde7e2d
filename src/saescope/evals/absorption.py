"""Feature absorption on first letters (label-free, after SAEBench / "A is for Absorption").

Labels come from the tokenizer itself: whole-word tokens and their first letter. A linear probe
learns "starts with letter ℓ" from the model's activations at the site; for each letter the SAE's
main latents are the few whose activations best detect it (k-sparse selection, k grown while F1
improves). A test word is *absorbed* when the probe gets its letter right, the main latents stay
silent, and one other active latent, aligned with the letter's probe direction (decoder cosine
above a threshold), carries at least half of the reconstruction's signal along that direction:
the letter has been absorbed into a more specific latent. The headline
rate is absorbed words / words the probe gets right whose main latents miss or not."""

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
                                cos_threshold: float = 0.025, share: float = 0.5, max_main: int = 3,
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
        cos = F.normalize(sae.W_dec.detach().cpu().float(), dim=1) @ directions.T  # [d_sae, letters]
    per_letter, absorbed, eligible = {}, 0, 0
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
        missed = rows[~fired[rows][:, main].any(1)] if main else rows
        # each active latent's share of the reconstruction along the letter's probe direction; the
        # word is absorbed when one latent aligned with it (cosine above the threshold) carries at
        # least `share` of that signal (a low cosine alone is met by chance in high dimensions)
        contrib = (acts[missed] * cos[:, li][None]).clamp_min(0)
        total = contrib.sum(1).clamp_min(1e-12)
        aligned = contrib * (cos[:, li] > cos_threshold)[None]
        n_abs = int(((aligned.max(1).values / total) >= share).sum()) if len(missed) else 0
        absorbed += n_abs
        eligible += len(rows)
        per_letter[letter] = {"main_latents": main, "main_f1": best, "test_words": len(rows),
                              "missed_by_main": len(missed), "absorbed": n_abs}
    return {"absorption_rate": absorbed / max(eligible, 1),
            "probe_accuracy": float((predicted == y[test]).float().mean()),
            "n_words": len(labels), "letters": per_letter, "cos_threshold": cos_threshold, "share": share}
