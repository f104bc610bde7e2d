"""The feature database: one SQLite file per SAE set, holding what the explorer's pages show.

Schema (every per-latent table is keyed and indexed by (sae, latent), the pages' only lookup):

    meta(key PRIMARY KEY, value)                 model, site of each SAE, logit-lens note, build info
    saes(id PRIMARY KEY, site, target_site, arch, d_sae, d_in, path, n_tokens, l0)
                                                 path: relative to the database's folder (files.recorded_path)
    latents(sae, latent, density, max_act, mean_act, histogram JSON, top_tokens JSON of their text)
    examples(sae, latent, kind 'top' | 'quantile', rank, band, seq, pos, act, lo, acts BLOB float32)
                                                 acts: the latent on tokens lo, lo+1, … of the row
    logits(sae, latent, sign +1 | -1, rank, token, value)
    neighbours(sae, latent, rank, other, cosine)
    sequences(seq PRIMARY KEY, tokens BLOB int32)  the held-out rows the examples point into
    vocab(token PRIMARY KEY, text)                 every token id that appears anywhere above
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS saes (id TEXT PRIMARY KEY, site TEXT NOT NULL, target_site TEXT, arch TEXT NOT NULL,
    d_sae INTEGER NOT NULL, d_in INTEGER NOT NULL, path TEXT NOT NULL, n_tokens INTEGER NOT NULL, l0 REAL NOT NULL);
CREATE TABLE IF NOT EXISTS latents (sae TEXT NOT NULL, latent INTEGER NOT NULL, density REAL NOT NULL,
    max_act REAL NOT NULL, mean_act REAL NOT NULL, histogram TEXT NOT NULL, top_tokens TEXT NOT NULL,
    PRIMARY KEY (sae, latent));
CREATE INDEX IF NOT EXISTS latents_by_density ON latents (sae, density);
CREATE INDEX IF NOT EXISTS latents_by_max ON latents (sae, max_act);
CREATE TABLE IF NOT EXISTS examples (sae TEXT NOT NULL, latent INTEGER NOT NULL, kind TEXT NOT NULL,
    rank INTEGER NOT NULL, band INTEGER, seq INTEGER NOT NULL, pos INTEGER NOT NULL, act REAL NOT NULL,
    lo INTEGER NOT NULL, acts BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS examples_by_latent ON examples (sae, latent, kind, rank);
CREATE TABLE IF NOT EXISTS logits (sae TEXT NOT NULL, latent INTEGER NOT NULL, sign INTEGER NOT NULL,
    rank INTEGER NOT NULL, token INTEGER NOT NULL, value REAL NOT NULL);
CREATE INDEX IF NOT EXISTS logits_by_latent ON logits (sae, latent, sign, rank);
CREATE TABLE IF NOT EXISTS neighbours (sae TEXT NOT NULL, latent INTEGER NOT NULL, rank INTEGER NOT NULL,
    other INTEGER NOT NULL, cosine REAL NOT NULL);
CREATE INDEX IF NOT EXISTS neighbours_by_latent ON neighbours (sae, latent, rank);
CREATE TABLE IF NOT EXISTS sequences (seq INTEGER PRIMARY KEY, tokens BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS vocab (token INTEGER PRIMARY KEY, text TEXT NOT NULL);
"""


def connect(path: str | Path, *, readonly: bool = False) -> sqlite3.Connection:
    """Open the database; read-only connections cannot change it (the server uses those)."""
    if readonly:
        con = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True, check_same_thread=False)
    else:
        con = sqlite3.connect(path)
        con.executescript(SCHEMA)
    con.row_factory = sqlite3.Row
    return con
