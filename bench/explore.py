"""Scale check of `saescope explore build`: one wide SAE over many tokens, with time and memory.

    python bench/explore.py [--d-sae 16384] [--tokens 1000000] [--source FILE_OR_DIR] [--sae PATH] [--out FILE.json]

The build keeps O(d_sae · (top-k + sample)) numbers per SAE in memory and spills the non-zero
activations to disk, so its peak RSS should stay flat as --tokens grows. Without --sae the SAE is
a freshly initialised TopK (k = --k) at --site: every token fires exactly k latents, which is the
load a trained SAE at L0 = k puts on the build. The table also gives the bare model forward over
the same rows, since that is the floor the build cannot beat."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
from pathlib import Path

import torch

from saescope import CorpusConfig, load_model
from saescope.data import token_tensor

from common import bare_forward_seconds
from saescope.explore import build
from saescope.sae import SAEConfig, build_sae
from saescope.sae.formats import load_sae
from saescope.site import Site


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m-q4km")
    p.add_argument("--site", default="resid.6")
    p.add_argument("--sae", default=None, help="an SAE to index (default: a fresh TopK of --d-sae, --k)")
    p.add_argument("--d-sae", type=int, default=16384)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--tokens", type=int, default=1_000_000)
    p.add_argument("--source", default="python-docs", help="corpus: built-in name, .txt/.jsonl/.parquet file or folder")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bare-tokens", type=int, default=16384, help="tokens for the bare-forward reference")
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    a = p.parse_args()

    lm = load_model(a.model)
    rows = token_tensor(lm, CorpusConfig(source=a.source, seq_len=a.seq_len, split="all"), a.tokens)
    if a.sae:
        sae = load_sae(a.sae)
    else:
        sae = build_sae(SAEConfig(arch="topk", d_in=lm.d_model, d_sae=a.d_sae, k=a.k, site=a.site))
        sae.init_weights(torch.Generator().manual_seed(0))
    site = Site.parse(sae.cfg.site or a.site)

    ref = rows[: max(1, a.bare_tokens // a.seq_len)].long()
    bare = ref.numel() / bare_forward_seconds(lm, ref, site.layer, a.batch)

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with tempfile.TemporaryDirectory(dir=Path(a.out).parent if a.out else None) as tmp:
        info = build({"sae": (sae, "bench")}, lm, rows, Path(tmp) / "features.db", batch_size=a.batch)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    result = {"model": lm.name, "site": str(site), "d_sae": sae.cfg.d_sae, "arch": sae.cfg.arch,
              "rows": len(rows), "seq_len": a.seq_len, "tokens": info["tokens"], "seconds": info["seconds"],
              "tokens_per_s": info["tokens"] / info["seconds"], "bare_forward_tokens_per_s": bare,
              "db_mib": info["bytes"] / 2**20, "peak_rss_mib": peak, "rss_before_build_mib": rss_before,
              "threads": torch.get_num_threads()}
    print(f"explore build benchmark: {lm.name}, {sae.cfg.arch} {sae.cfg.d_sae} at {site}, "
          f"{info['tokens']:,} tokens ({len(rows)} × {a.seq_len}), batch {a.batch}, {result['threads']} threads")
    print("| what                             |        value |")
    print("|----------------------------------|--------------|")
    for label, value in (("build time (s)", f"{info['seconds']:.0f}"), ("build tokens/s", f"{result['tokens_per_s']:.0f}"),
                         ("bare forward tokens/s", f"{bare:.0f}"),
                         ("build / bare forward", f"{result['tokens_per_s'] / bare:.2f}"),
                         ("database (MiB)", f"{result['db_mib']:.1f}"), ("peak RSS (MiB)", f"{peak:.0f}"),
                         ("RSS before the build (MiB)", f"{rss_before:.0f}")):
        print(f"| {label:<32} | {value:>12} |")
    if a.out:
        Path(a.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
