"""Sites against a hand-computed pass through a block's own submodules (attention written out by hand)."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_model
from saescope import LanguageModel, SaescopeError, Site, capture, splice
from saescope.lm import available_sites, forward_until, parse_sites


def _rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary embedding (rotate-half form) for x [batch, heads, seq, head_dim]."""
    d = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * inv[None]
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def reference_block(model, layer: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Gemma 2/3 block `layer` applied to its input x [batch, seq, d], attention by hand."""
    cfg = model.config
    block = model.model.layers[layer]
    attn = block.self_attn
    b, t, _ = x.shape
    n_h, n_kv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    h = block.input_layernorm(x)
    q = attn.q_proj(h).view(b, t, n_h, hd).transpose(1, 2)
    k = attn.k_proj(h).view(b, t, n_kv, hd).transpose(1, 2)
    v = attn.v_proj(h).view(b, t, n_kv, hd).transpose(1, 2)
    layer_type = cfg.layer_types[layer]
    rope = cfg.rope_parameters
    theta = rope[layer_type]["rope_theta"] if layer_type in rope else rope["rope_theta"]
    if hasattr(attn, "q_norm"):  # Gemma 3 normalises queries and keys per head
        q, k = attn.q_norm(q), attn.k_norm(k)
    q, k = _rope(q, theta), _rope(k, theta)
    k = k.repeat_interleave(n_h // n_kv, dim=1)
    v = v.repeat_interleave(n_h // n_kv, dim=1)
    scores = q @ k.transpose(-1, -2) * cfg.query_pre_attn_scalar ** -0.5
    if cfg.attn_logit_softcapping:
        scores = torch.tanh(scores / cfg.attn_logit_softcapping) * cfg.attn_logit_softcapping
    i, j = torch.arange(t)[:, None], torch.arange(t)[None]
    allowed = j <= i
    if layer_type == "sliding_attention":
        allowed &= (i - j) < cfg.sliding_window
    scores = scores.masked_fill(~allowed, float("-inf"))
    z = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, n_h * hd)
    mid = x + block.post_attention_layernorm(attn.o_proj(z))
    norm = block.pre_feedforward_layernorm
    ln2 = mid / torch.sqrt(mid.pow(2).mean(-1, keepdim=True) + norm.eps)  # before the learned scale
    mlp_in = ln2 * (1 + norm.weight)  # Gemma's RMSNorm scales by 1 + w
    mlp = block.post_feedforward_layernorm(block.mlp(mlp_in))
    return {"attn": z, "mlp_in": mlp_in, "mlp": mlp, "resid": mid + mlp, "resid_mid": mid, "ln2": ln2}


KINDS = ("resid", "attn", "mlp", "mlp_in", "ln2", "resid_mid")


@pytest.mark.parametrize("layer", [0, 1])
def test_capture_matches_hand_computed_block(gemma_lm, layer):
    ids = torch.randint(4, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = gemma_lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        ref = reference_block(gemma_lm.model, layer, hidden[layer])
    acts = capture(gemma_lm, ids, [f"{k}.{layer}" for k in KINDS])
    assert acts[f"attn.{layer}"].shape == (2, 10, 48)  # heads × head_dim, not d_model
    for kind in KINDS:
        torch.testing.assert_close(acts[f"{kind}.{layer}"], ref[kind], rtol=1e-4, atol=1e-5, msg=kind)
    torch.testing.assert_close(acts[f"resid.{layer}"], hidden[layer + 1])
    rms = acts[f"ln2.{layer}"].pow(2).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones_like(rms), rtol=1e-3, atol=1e-3)
    assert not torch.allclose(acts[f"ln2.{layer}"], acts[f"mlp_in.{layer}"], rtol=0.05, atol=0.05)


@pytest.mark.parametrize("kind", ["ln2", "resid_mid"])
def test_splice_before_the_mlp_reaches_the_rest_of_the_block(gemma_lm, kind):
    """A value replaced at ln2 goes through the norm's scale into the MLP; one replaced at
    resid_mid also reaches the residual add after the MLP: the block's output as hand-computed."""
    ids = torch.randint(4, 512, (1, 7), generator=torch.Generator().manual_seed(5))
    shift = torch.randn(32, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        hidden = gemma_lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        ref = reference_block(gemma_lm.model, 1, hidden[1])
        block = gemma_lm.model.model.layers[1]
        if kind == "ln2":
            mid = ref["resid_mid"]
            mlp_in = (ref["ln2"] + shift) * (1 + block.pre_feedforward_layernorm.weight)
        else:
            mid = ref["resid_mid"] + shift
            mlp_in = block.pre_feedforward_layernorm(mid)
        want = mid + block.post_feedforward_layernorm(block.mlp(mlp_in))
        with splice(gemma_lm, f"{kind}.1", lambda x: x + shift):
            got = capture(gemma_lm, ids, ["resid.1", "mlp_in.1"])
    torch.testing.assert_close(got["resid.1"], want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["mlp_in.1"], mlp_in, rtol=1e-4, atol=1e-4)


def test_gemma2_attention_is_soft_capped_however_the_model_was_built():
    """Scores far over a small cap: a model built for SDPA (which cannot cap) runs eager attention,
    and the head outputs are the hand-computed capped ones, not the uncapped."""
    model = tiny_model("gemma2")
    model.config.attn_logit_softcapping = 0.5
    for block in model.model.layers:
        block.self_attn.attn_logit_softcapping = 0.5
        with torch.no_grad():  # scores of several units, far over the cap
            block.self_attn.q_proj.weight.mul_(8)
            block.self_attn.k_proj.weight.mul_(8)
    model.config._attn_implementation = "sdpa"  # as transformers 4.x builds Gemma 2 by default; SDPA cannot cap
    lm = LanguageModel(model)
    assert model.config._attn_implementation == "eager"
    ids = torch.randint(4, 512, (1, 9), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
        capped = reference_block(model, 0, hidden[0])["attn"]
        model.config.attn_logit_softcapping = None
        uncapped = reference_block(model, 0, hidden[0])["attn"]
        model.config.attn_logit_softcapping = 0.5
    assert (capped - uncapped).abs().max() > 0.05  # the scores exceed the cap: capping matters here
    torch.testing.assert_close(capture(lm, ids, "attn.0")["attn.0"], capped, rtol=1e-4, atol=1e-5)


def test_capture_stops_after_deepest_layer(tiny_lm):
    ran = []
    handles = [tiny_lm.layers[2].register_forward_hook(lambda *a: ran.append("layer2")),
               tiny_lm.model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head")),
               tiny_lm.layers[1].register_forward_hook(lambda *a: ran.append("layer1"))]
    try:
        capture(tiny_lm, torch.tensor([[2, 5, 6, 7]]), ["mlp.0", "resid.1"])
        assert ran == ["layer1"]
        ran.clear()
        forward_until(tiny_lm, torch.tensor([[2, 5, 6]]), 0)
        assert ran == []
    finally:
        for h in handles:
            h.remove()


def test_splice_replaces_sites(gemma_lm):
    ids = torch.randint(4, 512, (1, 8), generator=torch.Generator().manual_seed(4))
    clean = capture(gemma_lm, ids, ["resid.1", "mlp.1"])
    with splice(gemma_lm, "mlp.1", torch.zeros_like):
        spliced = capture(gemma_lm, ids, ["resid.1"])
    torch.testing.assert_close(spliced["resid.1"], clean["resid.1"] - clean["mlp.1"], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        logits = gemma_lm(ids)
        with splice(gemma_lm, "resid.1", lambda x: x.clone()):
            same = gemma_lm(ids)
        with splice(gemma_lm, "attn.0", torch.zeros_like):
            changed = gemma_lm(ids)
    torch.testing.assert_close(same, logits)
    assert not torch.allclose(changed, logits)
    with torch.no_grad():  # the hooks are gone after the block
        torch.testing.assert_close(gemma_lm(ids), logits)


def test_splice_rejects_wrong_shape(tiny_lm):
    with pytest.raises(SaescopeError, match=r"splice at resid.0: function returned \(1, 3, 5\)"):
        with splice(tiny_lm, "resid.0", lambda x: torch.zeros(1, 3, 5)):
            tiny_lm(torch.tensor([[2, 5, 6]]))


def test_site_names():
    assert Site.parse("resid.6") == Site("resid", 6)
    assert Site.parse("blocks.6.hook_resid_post") == Site("resid", 6)
    assert Site.parse("blocks.6.attn.hook_z") == Site("attn", 6)
    assert Site.parse("blocks.6.hook_mlp_out") == Site("mlp", 6)
    assert Site.parse("blocks.6.ln2.hook_normalized") == Site("ln2", 6)  # before the norm's scale
    assert Site.parse("blocks.6.mlp.hook_in") == Site("mlp_in", 6)  # after it (fold_ln off)
    assert Site.parse("blocks.6.hook_mlp_in") == Site("resid_mid", 6)  # TransformerLens: before the norm
    assert Site.parse("blocks.6.hook_resid_mid") == Site("resid_mid", 6)
    assert Site("mlp_in", 3).hf_point == "model.layers.3.pre_feedforward_layernorm.output"
    assert Site.from_hf_point("model.layers.3.pre_feedforward_layernorm.input") == Site("resid_mid", 3)
    with pytest.raises(SaescopeError, match="ln2.3 is no module's input or output"):
        Site("ln2", 3).hf_point
    for s in ("resid.3", "attn.0", "mlp.17", "mlp_in.2", "ln2.4", "resid_mid.5"):
        assert str(Site.parse(s)) == s and Site.parse(Site.parse(s).tl_name) == Site.parse(s)
    assert [str(s) for s in parse_sites("resid.1, mlp.1,resid.1")] == ["resid.1", "mlp.1"]


@pytest.mark.parametrize("bad, message", [
    ("resdi.6", "unknown site kind 'resdi'; available: resid, attn, mlp, mlp_in, ln2, resid_mid"),
    ("blocks.6.hook_q", "unknown site 'blocks.6.hook_q'"),
    ("resid", "unknown site 'resid'"),
])
def test_bad_site_names(bad, message):
    with pytest.raises(SaescopeError, match="^" + message.replace("(", r"\(").replace(".", r"\.")):
        Site.parse(bad)


def test_layer_out_of_range(tiny_lm):
    with pytest.raises(SaescopeError, match=r"layer 3 out of range; tiny-gemma3 has layers 0\.\.2"):
        capture(tiny_lm, torch.tensor([[2, 5]]), "resid.3")
    assert available_sites(tiny_lm)[:4] == ["resid.0", "attn.0", "mlp.0", "mlp_in.0"]


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_other_block_styles(kind):
    lm = LanguageModel(tiny_model(kind))
    ids = torch.randint(4, 512, (1, 6))
    acts = capture(lm, ids, [f"{k}.1" for k in KINDS])
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["resid.1"], hidden[2])
    assert all(a.shape == (1, 6, 32) for a in acts.values())
    mid = acts["resid_mid.1"]  # by hand from the block's other sites: the residual before the MLP
    torch.testing.assert_close(mid + acts["mlp.1"], acts["resid.1"])
    block = lm.layers[1]
    if kind == "llama":  # RMSNorm scaled by w
        norm = block.post_attention_layernorm
        ln2 = mid / torch.sqrt(mid.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
        mlp_in = ln2 * norm.weight
    else:  # LayerNorm: centred, scaled by w, plus b
        norm = block.ln_2
        centred = mid - mid.mean(-1, keepdim=True)
        ln2 = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + norm.eps)
        mlp_in = ln2 * norm.weight + norm.bias
    torch.testing.assert_close(acts["ln2.1"], ln2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acts["mlp_in.1"], mlp_in, rtol=1e-4, atol=1e-5)


def test_parallel_residual_has_no_resid_mid():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    lm = LanguageModel(GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                                                        num_hidden_layers=2, num_attention_heads=2,
                                                        use_parallel_residual=True)), name="neox")
    with pytest.raises(SaescopeError, match="resid_mid.0: neox adds attention and MLP to the residual in parallel"):
        capture(lm, torch.tensor([[2, 5]]), "resid_mid.0")
    assert "resid_mid.0" not in available_sites(lm) and "ln2.0" in available_sites(lm)


def test_unmappable_model_is_named():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = torch.nn.Module()
            self.model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2)])

    with pytest.raises(SaescopeError, match="cannot map the blocks of Odd: block Linear has"):
        LanguageModel(Odd())
    with pytest.raises(SaescopeError, match="no decoder layer list"):
        LanguageModel(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("kind", ["gemma2", "gemma3", "llama", "gpt2"])
def test_a_forward_from_a_recorded_block_equals_the_whole_forward(kind):
    """Replaying blocks 0…L−1 from an earlier forward of the same ids gives the same logits, with a
    value spliced at layer L too, and runs none of those blocks' insides."""
    from saescope.lm.sites import block_outputs, skipping

    lm = LanguageModel(tiny_model(kind))
    ids = torch.randint(4, 512, (2, 7), generator=torch.Generator().manual_seed(8))
    shift = torch.randn(32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        with block_outputs(lm, 2) as before:
            clean = lm(ids)
        with splice(lm, "resid_mid.2", lambda x: x + shift):
            want = lm(ids)
        ran = []
        handle = lm.layers[1].register_forward_hook(lambda *a: ran.append(1))
        inner = next(iter(lm.layers[0].children())).register_forward_hook(lambda *a: ran.append(0))
        with skipping(lm, before):
            torch.testing.assert_close(lm(ids), clean)
            with splice(lm, "resid_mid.2", lambda x: x + shift):
                torch.testing.assert_close(lm(ids), want)
        handle.remove()
        inner.remove()
        assert ran == [1, 1]  # the skipped block's own hooks still see its (replayed) output; its insides never run
        torch.testing.assert_close(lm(ids), clean)  # restored
