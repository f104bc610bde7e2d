"""Attribution graphs (SPEC §9) on tiny models: the local replacement model against the model, the
sum rule against a replay of the frozen linear model, a planted two-step circuit against its
hand-computed edges, pruning and scores against a graph worked by hand, files, CLI, bad input."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import tiny_model, tiny_transcoders

from saescope import JumpReLUSAE, LanguageModel, SAEConfig, capture, save_sae
from saescope.circuits import Graph, attribute, prune, scores
from saescope.circuits.files import GraphFile, feature_index, graph_json, load_graph, save_graph, write_graph_files
from saescope.circuits.local import Constants, frozen, trace
from saescope.cli import main
from saescope.errors import SaescopeError
from saescope.lm import splice
from saescope.sae.layers import Layers
from saescope.sae.multilayer import MultiLayerConfig, MultiLayerDictionary


def _clt(lm: LanguageModel, width: int = 16) -> MultiLayerDictionary:
    n = lm.n_layers
    d = MultiLayerDictionary(MultiLayerConfig(kind="clt", sites_in=[f"mlp_in.{i}" for i in range(n)],
                                              sites_out=[f"mlp.{i}" for i in range(n)], d_in=lm.d_model,
                                              d_out=lm.d_model, d_sae=width, model=lm.name))
    d.init_weights(torch.Generator().manual_seed(3))
    with torch.no_grad():
        for g in d.groups:
            g.W_enc.mul_(3.0)
        d.b_dec.normal_(0, 0.1)
    return d


def _unembed_input(lm: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    """The final residual the logits read, last position (logits before any soft-capping: the
    graph's logit nodes are the linear readout, measured against the mean logit)."""
    held = []
    h = lm.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: held.append(a[0][0, -1]))
    with torch.no_grad():
        lm(ids[None])
    h.remove()
    return held[0]


def _fixed_terms(lm: LanguageModel, layers: Layers, ids: torch.Tensor):
    """The frozen linear model with every source (features, errors, embeddings) at zero, written
    without the attribution code's backward passes: a replay of the prompt's patterns and scales
    in which each MLP output is the dictionary's bias plus its skip of the replayed input, and at
    position 0 (no nodes there) the model's own output with the skip's change."""
    n = lm.n_layers
    real = capture(lm, ids[None], [f"mlp.{i}" for i in range(n)] + [f"mlp_in.{i}" for i in range(n)])
    constants = Constants()
    trace(lm, layers, ids, constants)
    seen = {}

    def out(layer):
        def fn(v):
            skip = layers.skip(layer)
            y = layers.bias(layer) + torch.zeros_like(v) + (0.0 if skip is None else seen[layer] @ skip)
            y[:, 0] = real[f"mlp.{layer}"][:, 0] + (0.0 if skip is None else (seen[layer][:, 0] - real[f"mlp_in.{layer}"][:, 0]) @ skip)
            return y
        return fn

    with frozen(lm, constants), torch.no_grad(), contextlib.ExitStack() as stack:
        h = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: torch.zeros_like(o))
        stack.callback(h.remove)
        h = lm.model.get_output_embeddings().register_forward_pre_hook(lambda m, a: seen.__setitem__("final", a[0][0]))
        stack.callback(h.remove)
        for i in range(n):
            stack.enter_context(splice(lm, f"mlp_in.{i}", lambda v, i=i: seen.__setitem__(i, v) or v))
            stack.enter_context(splice(lm, f"mlp.{i}", out(i)))
        lm(ids[None])
    return {i: seen[i][0] for i in range(n)}, seen["final"]


@pytest.mark.parametrize("kind", ["gemma3", "gemma2", "llama", "gpt2"])
def test_frozen_model_keeps_the_forward_and_is_linear_in_the_values(kind):
    lm = LanguageModel(tiny_model(kind), name=kind)
    ids = torch.randint(3, 500, (1, 9))
    with torch.no_grad():
        clean = lm(ids)
        with frozen(lm):
            assert torch.allclose(lm(ids), clean, atol=1e-5)
    assert lm.model.config._attn_implementation != "saescope_frozen_pattern"
    assert all(p.requires_grad for p in lm.model.parameters())


def test_frozen_norm_gradient_is_the_scale_times_the_weight():
    lm = LanguageModel(tiny_model("gemma3"), name="gemma3")
    norm = lm.layers[0].pre_feedforward_layernorm
    x = torch.randn(1, 3, lm.d_model, requires_grad=True)
    with frozen(lm):
        y = norm(x)
    v = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x, v)
    scale = torch.rsqrt(x.detach().pow(2).mean(-1, keepdim=True) + norm.eps)
    assert torch.allclose(g, v * scale * (1 + norm.weight.detach()), atol=1e-6)


@pytest.mark.parametrize("kind,dictionary", [("gemma3", "set"), ("llama", "set"), ("gpt2", "set"), ("gemma2", "set"),
                                             ("gemma3", "clt")])
def test_sum_rule(kind, dictionary):
    """Every node's value (a feature's pre-activation; a logit against the mean logit) equals its
    incoming edges plus what stays when every source is zero."""
    lm = LanguageModel(tiny_model(kind), name=kind)
    d = tiny_transcoders(lm) if dictionary == "set" else _clt(lm)
    ids = torch.randint(3, 500, (9,), generator=torch.Generator().manual_seed(1))
    g = attribute(lm, d, ids, batch_size=16, max_logits=3, progress=False)
    assert g.n_features == g.n_active > 20
    layers = Layers(d)
    mlp_in, final = _fixed_terms(lm, layers, ids)
    pre = g.extra["pre_activations"]
    for r, (layer, pos, latent) in enumerate(g.features.tolist()):
        fixed = float((layers.encoder(layer)[:, latent] @ mlp_in[layer][pos] + layers.encoder_bias(layer)[latent]).detach())
        scale = float(g.adjacency[r].abs().sum()) + abs(fixed)
        assert float(g.adjacency[r].sum()) + fixed == pytest.approx(float(pre[r]), abs=2e-5 * scale)
    unembed = lm.model.get_output_embeddings().weight.detach()
    h = _unembed_input(lm, ids)
    for q, tok in enumerate(g.logit_tokens.tolist()):
        u = unembed[tok] - unembed.mean(0)
        fixed = float(u @ final[-1])
        row = g.adjacency[g.logit_start + q]
        assert float(row.sum()) + fixed == pytest.approx(float(u @ h), abs=2e-5 * (float(row.abs().sum()) + abs(fixed)))


class _TranscoderMLP(torch.nn.Module):
    def __init__(self, sae):
        super().__init__()
        self.sae = sae

    def forward(self, x):
        return self.sae(x)


def test_exact_transcoders_leave_no_error():
    """A model whose MLPs are its transcoders: every error node is zero, all influence on the logits
    runs through features (replacement score 1), and the logits are the edges' sums plus fixed terms."""
    lm = LanguageModel(tiny_model("llama", n_layers=2), name="llama")
    saes = tiny_transcoders(lm, skip=())
    for block, sae in zip(lm.layers, saes):
        block.mlp = _TranscoderMLP(sae)
    ids = torch.randint(3, 500, (8,), generator=torch.Generator().manual_seed(2))
    g = attribute(lm, saes, ids, batch_size=8, max_logits=2, progress=False)
    assert g.extra["error_vectors"].abs().max() < 1e-5
    assert g.adjacency[:, g.error_start:g.token_start].abs().max() < 1e-4 * g.adjacency.abs().max()
    assert scores(g)[0] == pytest.approx(1.0, abs=1e-4)
    mlp_in, final = _fixed_terms(lm, Layers(saes), ids)
    with torch.no_grad():
        logits = lm(ids[None])[0, -1]
    unembed = lm.model.get_output_embeddings().weight.detach()
    for q, tok in enumerate(g.logit_tokens.tolist()):
        fixed = float((unembed[tok] - unembed.mean(0)) @ final[-1])
        assert float(g.adjacency[g.logit_start + q].sum()) + fixed == pytest.approx(float(logits[tok] - logits.mean()), rel=1e-4)


def test_planted_two_step_circuit():
    """Attention off (output projections zero): feature A at layer 0 writes v, feature B at layer 1
    reads w, writes d_B; the edges A → B, B → logit and A → logit are the frozen norms' products."""
    torch.manual_seed(0)
    lm = LanguageModel(tiny_model("llama", n_layers=2), name="llama")
    for block in lm.layers:
        torch.nn.init.zeros_(block.self_attn.o_proj.weight)
    ids = torch.randint(3, 500, (6,), generator=torch.Generator().manual_seed(4))
    d = lm.d_model
    saes = []
    for layer in range(2):
        sae = JumpReLUSAE(SAEConfig(d_in=d, d_sae=8, d_out=d, site=f"mlp_in.{layer}", target_site=f"mlp.{layer}"))
        with torch.no_grad():
            sae.W_enc.zero_()
            sae.b_enc.fill_(-1.0)
            sae.set_threshold(torch.full((8,), 0.01))
            sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(8, d), dim=1))
            sae.b_dec.zero_()
        saes.append(sae)
    seen = capture(lm, ids[None], ["mlp_in.0", "resid.0", "resid.1"])
    x0 = seen["mlp_in.0"][0, -1]
    a, b = 3, 5
    with torch.no_grad():
        saes[0].W_enc[:, a] = 2 * x0 / x0.pow(2).sum()  # A fires with activation 2 at the last token only
        saes[0].b_enc[a] = 0.0
        saes[1].W_enc[:, b] = torch.nn.functional.normalize(torch.randn(d), dim=0)
        saes[1].b_enc[b] = 5.0                                   # B fires everywhere
    target = 7
    g = attribute(lm, saes, ids, targets=[target], batch_size=8, progress=False)
    rows = {tuple(f): r for r, f in enumerate(g.features.tolist())}
    n = len(ids) - 1
    ra, rb = rows[(0, n, a)], rows[(1, n, b)]
    act_a, act_b = float(g.activations[ra]), float(g.activations[rb])
    assert act_a == pytest.approx(2.0, rel=1e-4)
    cfg = lm.config
    r1 = torch.rsqrt(seen["resid.0"][0, -1].pow(2).mean() + cfg.rms_norm_eps)
    rf = torch.rsqrt(seen["resid.1"][0, -1].pow(2).mean() + cfg.rms_norm_eps)
    w1 = lm.layers[1].post_attention_layernorm.weight.detach()
    wf = lm.model.model.norm.weight.detach()
    v, e_b, d_b = saes[0].W_dec[a].detach(), saes[1].W_enc[:, b].detach(), saes[1].W_dec[b].detach()
    unembed = lm.model.get_output_embeddings().weight.detach()
    u = unembed[target] - unembed.mean(0)
    logit = g.logit_start
    assert float(g.adjacency[rb, ra]) == pytest.approx(float(act_a * (e_b * r1 * w1 * v).sum()), rel=1e-4)
    assert float(g.adjacency[logit, rb]) == pytest.approx(float(act_b * (u * rf * wf * d_b).sum()), rel=1e-4)
    assert float(g.adjacency[logit, ra]) == pytest.approx(float(act_a * (u * rf * wf * v).sum()), rel=1e-4)
    # no other position reaches the last one without attention, and B at earlier positions does not reach the logit
    assert float(g.adjacency[logit, rows[(1, 0 + 1, b)]]) == 0.0


def _hand_graph() -> Graph:
    """Two features (f0 at layer 0, f1 at layer 1, both at position 1), 2 layers × 2 positions of
    errors, 2 tokens, 1 logit; weights chosen so every influence is a short fraction."""
    a = torch.zeros(9, 9)
    f0, f1, err01, err11, tok0, tok1, logit = 0, 1, 3, 5, 6, 7, 8
    a[f1, f0], a[f1, tok1], a[f1, err01] = 2.0, 1.0, 1.0
    a[f0, tok1], a[f0, tok0] = 3.0, 1.0
    a[logit, f1], a[logit, f0], a[logit, err11] = 4.0, -2.0, 2.0
    return Graph(prompt="ab", tokens=torch.tensor([2, 9]), token_strings=["<bos>", "b"],
                 features=torch.tensor([[0, 1, 4], [1, 1, 6]]), activations=torch.tensor([1.0, 2.0]),
                 logit_tokens=torch.tensor([11]), logit_strings=["c"], logit_probabilities=torch.tensor([1.0]),
                 adjacency=a, n_layers=2, model="hand", dictionary="hand", n_active=2)


def test_pruning_and_scores_by_hand():
    g = _hand_graph()
    # influence on the logit: f1 1/2, f0 1/4 + 1/4, err11 1/4, err01 1/8, tok1 5/16 + 3/16, tok0 1/16 + 1/16
    replacement, completeness = scores(g)
    assert replacement == pytest.approx(0.625)       # tokens 5/8 against errors 3/8
    assert completeness == pytest.approx(2.625 / 3)  # logit 3/4 and f1 3/4 non-error inputs, weighted
    kept = prune(g, node_threshold=0.8, edge_threshold=0.98)
    # shares .25 each for f1, f0, tok1, then err11 .125 reaches .875 ≥ .8: err01 (1/16 of the total) goes
    assert kept.nodes.tolist() == [True, True, False, False, False, True, True, True, True]
    edges = {(int(t), int(s)) for t, s in torch.nonzero(kept.edges)}
    assert edges == {(8, 1), (8, 0), (8, 5), (1, 0), (1, 7), (0, 7), (0, 6)}
    # at 0.9 the smallest edge score, tok0 → f0 (0.1458 of 2.0833), is the one left out
    assert (0, 6) not in {(int(t), int(s)) for t, s in torch.nonzero(prune(g, 0.8, 0.9).edges)}
    assert kept.cumulative.max() == pytest.approx(1.0)
    with pytest.raises(SaescopeError, match="node_threshold"):
        prune(g, node_threshold=1.5)


def test_graph_files_round_trip_and_schema(tmp_path):
    g = _hand_graph()
    path = write_graph_files(g, tmp_path / "graphs", "hand-1", labels={(1, 6): "the letter c"})
    data = json.loads(path.read_text())
    GraphFile.model_validate(data)
    ids = {n["node_id"] for n in data["nodes"]}
    assert {"0_4_1", "1_6_1", "0_1_1", "E_2_0", "E_9_1", "3_11_1"} <= ids and "0_0_1" not in ids
    node = next(n for n in data["nodes"] if n["node_id"] == "1_6_1")
    assert node["feature"] == feature_index(1, 6) == 34 and node["clerp"] == "the letter c"
    assert {(lk["source"], lk["target"], lk["weight"]) for lk in data["links"]} >= {("0_4_1", "1_6_1", 2.0), ("1_6_1", "3_11_1", 4.0)}
    index = json.loads((tmp_path / "graphs" / "graph-metadata.json").read_text())
    assert [m["slug"] for m in index["graphs"]] == ["hand-1"]
    write_graph_files(g, tmp_path / "graphs", "hand-1")
    assert len(json.loads((tmp_path / "graphs" / "graph-metadata.json").read_text())["graphs"]) == 1
    back = load_graph(save_graph(g, tmp_path / "hand.safetensors"))
    assert torch.equal(back.adjacency, g.adjacency) and back.token_strings == g.token_strings
    assert graph_json(back, "x") == graph_json(g, "x")
    with pytest.raises(SaescopeError, match="slug"):
        graph_json(g, "../up")
    bad = dict(data, links=data["links"] + [{"source": "nowhere", "target": "1_6_1", "weight": 1.0}])
    with pytest.raises(ValueError, match="nowhere"):
        GraphFile.model_validate(bad)


def test_budget_keeps_the_most_influential_features():
    lm = LanguageModel(tiny_model("gemma3"), name="gemma3")
    saes = tiny_transcoders(lm)
    ids = torch.randint(3, 500, (9,), generator=torch.Generator().manual_seed(1))
    full = attribute(lm, saes, ids, batch_size=16, max_logits=3, progress=False)
    part = attribute(lm, saes, ids, batch_size=8, update_interval=1, max_feature_nodes=24, max_logits=3, progress=False)
    assert part.n_features == 24 and part.n_active == full.n_active
    rows = {tuple(f): r for r, f in enumerate(full.features.tolist())}
    picked = [rows[tuple(f)] for f in part.features.tolist()]
    # every edge among the kept features is the full graph's
    n = 24
    assert torch.allclose(part.adjacency[:n, :n], full.adjacency[picked][:, picked], atol=1e-6)
    assert torch.allclose(part.adjacency[-3:, :n], full.adjacency[-3:][:, picked], atol=1e-6)
    # the first batch visited (after the logits) holds the features with the most direct logit influence
    direct = full.adjacency[full.logit_start:, :full.n_features].abs()
    shares = (direct / full.adjacency[full.logit_start:].abs().sum(1, keepdim=True) * full.logit_probabilities[:, None]).sum(0)
    assert set(shares.topk(8).indices.tolist()) <= set(picked)


def test_bad_input(tiny_lm):
    saes = tiny_transcoders(tiny_lm)
    with pytest.raises(SaescopeError, match="context"):
        attribute(tiny_lm, saes, torch.randint(3, 500, (tiny_lm.config.max_position_embeddings + 1,)), progress=False)
    with pytest.raises(SaescopeError, match="every layer"):
        attribute(tiny_lm, saes[:2], "The quick brown fox", progress=False)
    other = LanguageModel(tiny_model("gpt2"), name="gpt2")
    wide = [JumpReLUSAE(SAEConfig(d_in=48, d_sae=8, d_out=48, site=f"mlp_in.{i}", target_site=f"mlp.{i}")) for i in range(3)]
    with pytest.raises(SaescopeError, match="another model"):
        attribute(other, wide, torch.tensor([2, 5, 6]), progress=False)
    with pytest.raises(SaescopeError, match="target token"):
        attribute(tiny_lm, saes, "The quick brown fox", targets=[10**6], progress=False)


def test_cli_writes_a_graph_and_its_feature_pages(tmp_path, model_dir, tokenizer, doc_folder, capsys):
    import numpy as np

    from saescope import CorpusConfig
    from saescope.data import token_rows
    from saescope.explore import build

    lm = LanguageModel(tiny_model("gemma3"), tokenizer=tokenizer, name="tiny")
    saes = {}
    for sae in tiny_transcoders(lm):
        name = f"{sae.cfg.site}-jumprelu-tc-24"
        saes[name] = (sae, save_sae(sae, tmp_path / "saes" / name))
    rows = torch.from_numpy(np.stack(list(token_rows(lm, CorpusConfig(source=str(doc_folder), seq_len=32, split="all")))[:8]))
    build(saes, lm, rows, tmp_path / "features.db", batch_size=4, top_k=3, sample=8, bands=2, per_band=1, progress=False)
    out = tmp_path / "graphs" / "fox.json"
    code = main(["--quiet", "circuit", "--transcoders", str(tmp_path / "saes"), "--prompt", "The quick brown fox", "--model",
                 str(model_dir), "--out", str(out), "--batch-size", "8", "--features", str(tmp_path / "features.db")])
    assert code == 0, capsys.readouterr().err
    assert "replacement score" in capsys.readouterr().out
    data = json.loads(out.read_text())
    GraphFile.model_validate(data)
    assert load_graph(out.with_suffix(".safetensors")).prompt == "The quick brown fox"
    features = [n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder"]
    assert features and all(n["clerp"] for n in features)
    scan = data["metadata"]["scan"]
    for n in features:  # the page the frontend fetches for each node: features/<scan>/<feature>.json
        page = json.loads((out.parent / "features" / scan / f"{n['feature']}.json").read_text())
        layer, latent = int(n["layer"]), int(n["node_id"].split("_")[1])
        assert page["index"] == feature_index(layer, latent) == n["feature"]
        assert page["act_max"] > 0 and page["examples_quantiles"][0]["quantile_name"] == "Top activations"
        example = page["examples_quantiles"][0]["examples"][0]
        assert len(example["tokens"]) == len(example["tokens_acts_list"]) > example["train_token_ind"] >= 0
        assert len(page["top_logits"]) > 0
    code = main(["--quiet", "circuit", "--transcoders", str(tmp_path / "saes"), "--set", "nope", "--prompt", "x", "--model",
                 str(model_dir), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "no CLT or transcoder set named 'nope'" in err and len(err.strip().splitlines()) == 1
    code = main(["--quiet", "circuit", "--transcoders", str(out.parent), "--prompt", "x", "--model", str(model_dir),
                 "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err


def test_intervention_adds_the_decoder_change_and_nothing_else(tokenizer):
    from saescope.circuits import Intervention, intervene
    from saescope.circuits.intervene import _steered

    lm = LanguageModel(tiny_model("gemma3"), tokenizer=tokenizer, name="tiny")
    clt = _clt(lm)
    layers = Layers(clt)
    prompt = "The quick brown fox jumps"
    same = intervene(lm, clt, prompt, [], new_tokens=4)
    assert same["clean"] == same["intervened"]
    ids = torch.tensor(tokenizer(prompt)["input_ids"])
    ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids]) if int(ids[0]) != tokenizer.bos_token_id else ids
    x = capture(lm, ids[None], ["mlp_in.0"])["mlp_in.0"]
    f = layers.code(0, x)[0].detach()
    pos = 3
    latent = int(f[pos].argmax())
    act = float(f[pos, latent])
    assert act > 0
    sites = [f"mlp.{i}" for i in range(lm.n_layers)]
    clean = capture(lm, ids[None], sites)
    with _steered(lm, layers, [Intervention(0, pos, latent, 0.0)], []):
        changed = capture(lm, ids[None], ["mlp.0"])["mlp.0"]
    want = -act * layers.decoder(0)[latent, 0]
    assert torch.allclose((changed - clean["mlp.0"])[0, pos], want, atol=1e-5)
    assert torch.allclose(changed[0, :pos], clean["mlp.0"][0, :pos], atol=1e-6)
    out = intervene(lm, clt, prompt, [(0, pos, latent, 5 * act)], new_tokens=4)
    assert out["features"][0]["activation"] == pytest.approx(act, rel=1e-5)
    assert out["clean"]["top"] == same["clean"]["top"]
    assert out["intervened"]["top"] != out["clean"]["top"]
    free = intervene(lm, clt, prompt, [(0, pos, latent, 5 * act)], new_tokens=0, freeze_attention=False)
    assert free["intervened"]["top"] != out["intervened"]["top"]  # attention responds when not frozen
    for bad, match in [((0, 99, latent, 0.0), "position"), ((9, pos, latent, 0.0), "layer"), ((0, pos, 10**6, 0.0), "latent")]:
        with pytest.raises(SaescopeError, match=match):
            intervene(lm, clt, prompt, [bad])


def test_server_makes_lists_serves_and_intervenes_on_graphs(feature_db, tiny_lm):
    from fastapi.testclient import TestClient

    from saescope.explore.server import create_app

    db = feature_db[3]
    saes = tiny_transcoders(tiny_lm)
    read_only = TestClient(create_app(db, tiny_lm))
    assert read_only.get("/api/graphs").json() == {"graphs": [], "can_make": False}
    assert read_only.post("/api/graphs", json={"prompt": "The quick brown fox"}).status_code == 409
    client = TestClient(create_app(db, tiny_lm, transcoders=saes, transcoders_name="mlp_in.0-2-jumprelu-tc-24"))
    made = client.post("/api/graphs", json={"prompt": "The quick brown fox", "max_feature_nodes": 64})
    assert made.status_code == 200, made.text
    slug = made.json()["slug"]
    listed = client.get("/api/graphs").json()
    assert listed["can_make"] and [g["slug"] for g in listed["graphs"]] == [slug]
    data = client.get(f"/api/graphs/{slug}").json()
    GraphFile.model_validate({k: v for k, v in data.items() if k != "feature_saes"})
    assert data["metadata"]["prompt"] == "The quick brown fox" and data["feature_saes"] == {}
    node = next(n for n in data["nodes"] if n["feature_type"] == "cross layer transcoder")
    layer, latent, pos = map(int, node["node_id"].split("_"))
    out = client.post(f"/api/graphs/{slug}/intervene",
                      json={"interventions": [{"layer": layer, "position": pos, "latent": latent, "value": 0.0}]}).json()
    assert out["features"][0]["activation"] == pytest.approx(node["activation"], rel=1e-4)
    assert out["clean"]["top"] != out["intervened"]["top"]
    assert client.get("/api/graphs/..%2Ffeatures").status_code == 404
    assert client.post("/api/graphs", json={"prompt": "x" * 5000}).status_code == 422
    bad = client.post(f"/api/graphs/{slug}/intervene", json={"interventions": [{"layer": 0, "position": 99, "latent": 0}]})
    assert bad.status_code == 422 and "position" in bad.json()["detail"]


def test_clt_latents_get_feature_pages(tmp_path, model_dir, tokenizer, doc_folder):
    """explore build lists a CLT's latents layer by layer under the names a graph's nodes look up;
    their codes are the CLT's, and live text on them runs through the CLT."""
    from fastapi.testclient import TestClient

    from saescope import CorpusConfig, save_dictionary
    from saescope.explore.build import build_dir
    from saescope.explore.db import connect
    from saescope.explore.server import create_app
    from saescope.sae.export import member

    lm = LanguageModel(tiny_model("gemma3"), tokenizer=tokenizer, name="tiny")
    clt = _clt(lm)
    name = "mlp_in.0-2-jumprelu-clt-16"
    save_dictionary(clt, tmp_path / "saes" / name)
    build_dir(tmp_path / "saes", CorpusConfig(source=str(doc_folder), seq_len=32, split="all"), 256, model=str(model_dir),
              out=tmp_path / "features.db", progress=False)
    con = connect(tmp_path / "features.db", readonly=True)
    rows = {r["id"]: dict(r) for r in con.execute("SELECT * FROM saes")}
    assert set(rows) == {f"mlp_in.{i}-jumprelu-clt-16" for i in range(3)} == {member(name, clt.cfg.sites_in, i) for i in range(3)}
    assert rows["mlp_in.1-jumprelu-clt-16"]["site"] == "mlp_in.1" and rows["mlp_in.1-jumprelu-clt-16"]["d_sae"] == 16
    x = torch.randn(5, lm.d_model) * 3
    assert torch.equal(clt.layer_view(1).encode(x), clt.encode_group(1, x))
    client = TestClient(create_app(tmp_path / "features.db", lm))
    fired = client.post("/api/saes/mlp_in.1-jumprelu-clt-16/activations", json={"text": "The quick brown fox"})
    assert fired.status_code == 200 and fired.json()["tokens"]
