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
    mlp_in = block.pre_feedforward_layernorm(mid)
    mlp = block.post_feedforward_layernorm(block.mlp(mlp_in))
    return {"attn": z, "mlp_in": mlp_in, "mlp": mlp, "resid": mid + mlp, "mid": mid}


@pytest.mark.parametrize("layer", [0, 1])
def test_capture_matches_hand_computed_block(gemma_lm, layer):
    ids = torch.randint(4, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        hidden = gemma_lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        ref = reference_block(gemma_lm.model, layer, hidden[layer])
    acts = capture(gemma_lm, ids, [f"{k}.{layer}" for k in ("resid", "attn", "mlp", "mlp_in")])
    assert acts[f"attn.{layer}"].shape == (2, 10, 48)  # heads × head_dim, not d_model
    for kind in ("resid", "attn", "mlp", "mlp_in"):
        torch.testing.assert_close(acts[f"{kind}.{layer}"], ref[kind], rtol=1e-4, atol=1e-5, msg=kind)
    torch.testing.assert_close(acts[f"resid.{layer}"], hidden[layer + 1])


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
    assert Site.parse("blocks.6.ln2.hook_normalized") == Site("mlp_in", 6)
    for s in ("resid.3", "attn.0", "mlp.17", "mlp_in.2"):
        assert str(Site.parse(s)) == s and Site.parse(Site.parse(s).tl_name) == Site.parse(s)
    assert [str(s) for s in parse_sites("resid.1, mlp.1,resid.1")] == ["resid.1", "mlp.1"]


@pytest.mark.parametrize("bad, message", [
    ("resdi.6", "unknown site kind 'resdi'; available: resid, attn, mlp, mlp_in"),
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
    acts = capture(lm, ids, ["resid.1", "attn.1", "mlp.1", "mlp_in.1"])
    with torch.no_grad():
        hidden = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(acts["resid.1"], hidden[2])
    assert all(a.shape == (1, 6, 32) for a in acts.values())


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
