"""circuit-tracer's side of bench/circuit.py, run by its own venv's python (it pins transformers
≤ 4.57): its transcoder-set loader reads our circuit-tracer export, its TransformerLens
replacement model loads Gemma 3 270M from a local Hugging Face cache (no network), and its
attribute() and prune_graph() make each prompt's graph. One JSON line per prompt on stdout, the
graph's tensors in a safetensors file beside --out.

    python bench/circuit_peer.py --transcoders DIR --hf-home DIR --prompts FILE --out PREFIX
                                 [--max-feature-nodes N] [--batch-size B]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--transcoders", required=True)
    p.add_argument("--hf-home", required=True)
    p.add_argument("--prompts", required=True, help="a JSON list of prompts")
    p.add_argument("--out", required=True)
    p.add_argument("--max-feature-nodes", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=64)
    a = p.parse_args()
    os.environ["HF_HOME"], os.environ["HF_HUB_OFFLINE"] = a.hf_home, "1"
    import torch
    import yaml
    from circuit_tracer import ReplacementModel, attribute
    from circuit_tracer.replacement_model.replacement_model_transformerlens import TransformerLensReplacementModel
    from circuit_tracer.graph import compute_graph_scores, prune_graph
    from circuit_tracer.transcoder.single_layer_transcoder import load_transcoder_set
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    torch.set_grad_enabled(True)
    # circuit-tracer 0.5.0 shares one layer's RoPE tables with every layer to save memory; Gemma 3's
    # local and global layers rotate by different bases, so its model then computes other
    # activations than Gemma 3 (4% off at layer 0's MLP input, 20% by layer 5). Kept per layer here.
    TransformerLensReplacementModel._deduplicate_attention_buffers = lambda self: None
    cfg = yaml.safe_load(open(os.path.join(a.transcoders, "config.yaml")))
    n = sum(1 for f in os.listdir(a.transcoders) if f.startswith("layer_"))
    cpu = torch.device("cpu")
    transcoders = load_transcoder_set({i: os.path.join(a.transcoders, f"layer_{i}.safetensors") for i in range(n)},
                                      scan=cfg["scan"], feature_input_hook=cfg["feature_input_hook"],
                                      feature_output_hook=cfg["feature_output_hook"], device=cpu,
                                      lazy_encoder=False, lazy_decoder=False)
    snapshot = os.path.join(a.hf_home, "hub", "models--google--gemma-3-270m", "snapshots", "local")
    model = ReplacementModel.from_pretrained_and_transcoders("google/gemma-3-270m", transcoders, backend="transformerlens",
                                                             device=cpu, dtype=torch.float32,
                                                             tokenizer=AutoTokenizer.from_pretrained(snapshot))
    for k, prompt in enumerate(json.load(open(a.prompts))):
        start = time.perf_counter()
        graph = attribute(prompt, model, max_n_logits=10, desired_logit_prob=0.95, batch_size=a.batch_size,
                          max_feature_nodes=a.max_feature_nodes)
        seconds = time.perf_counter() - start
        nodes, _, _ = prune_graph(graph, 0.8, 0.98)
        replacement, completeness = compute_graph_scores(graph)
        save_file({"adjacency": graph.adjacency_matrix.float().contiguous(),
                   "features": graph.active_features[graph.selected_features].long().contiguous(),
                   "activations": graph.activation_values[graph.selected_features].float().contiguous(),
                   "tokens": graph.input_tokens.long().contiguous(),
                   "logit_tokens": torch.tensor([t.vocab_idx for t in graph.logit_targets]),
                   "logit_probabilities": graph.logit_probabilities.float().contiguous(),
                   "kept": nodes.contiguous()}, f"{a.out}-{k}.safetensors")
        print(json.dumps({"prompt": prompt, "seconds": seconds, "replacement": replacement, "completeness": completeness,
                          "n_active": int(graph.active_features.shape[0]), "n_layers": int(model.cfg.n_layers),
                          "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
