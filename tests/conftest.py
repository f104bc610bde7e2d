"""Fixtures: a small BPE tokenizer trained in memory and tiny random-weight Gemma 2 / Gemma 3 models;
`--device`, where the fast paths are checked against the reference."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu",
                     help="device of tests/test_fast.py (cpu, cuda, cuda:1, ...): the fast paths' kernels differ by "
                          "device, and an accelerator is at hand only now and then (bench/gpu.py passes it)")


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    return torch.device(request.config.getoption("--device"))

SAMPLE_DOCS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Sparse autoencoders find features in the residual stream of a language model.",
    "JumpReLU sets pre-activations at or below a threshold to zero.",
    "Python's standard library has modules for text, numbers, files and the network.",
    "A transcoder reads the MLP input and predicts the MLP output.",
    "Gemma Scope trained SAEs on every layer and site of Gemma 2.",
]


@pytest.fixture(scope="session")
def tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SAMPLE_DOCS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>",
                                   pad_token="<pad>", unk_token="<unk>")


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Norm weights start at zero in Gemma; give every parameter a random value so each site differs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def tiny_model(kind: str, n_layers: int = 3):
    from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config,
                              GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM)

    common = dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=n_layers,
                  num_attention_heads=2, num_key_value_heads=1, bos_token_id=2, eos_token_id=1, pad_token_id=0)
    torch.manual_seed(0)
    if kind == "gemma2":
        model = Gemma2ForCausalLM(Gemma2Config(head_dim=24, **common))
    elif kind == "gemma3":
        model = Gemma3ForCausalLM(Gemma3TextConfig(head_dim=24, sliding_window=4, **common))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common))
    elif kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=32, n_layer=n_layers, n_head=2,
                                           bos_token_id=2, eos_token_id=1))
    else:
        raise ValueError(kind)
    _randomise(model, seed=1)
    return model.eval()


@pytest.fixture(params=["gemma2", "gemma3"])
def gemma_lm(request, tokenizer):
    from saescope import LanguageModel

    return LanguageModel(tiny_model(request.param), tokenizer=tokenizer, name=f"tiny-{request.param}")


@pytest.fixture
def tiny_lm(tokenizer):
    from saescope import LanguageModel

    return LanguageModel(tiny_model("gemma3"), tokenizer=tokenizer, name="tiny-gemma3")


@pytest.fixture
def doc_folder(tmp_path):
    """A folder corpus with enough text for a few dozen 32-token rows."""
    import json

    folder = tmp_path / "docs"
    folder.mkdir()
    for i, doc in enumerate(SAMPLE_DOCS):
        (folder / f"{i}.txt").write_text(doc * 4)
    with (folder / "more.jsonl").open("w") as f:
        for i in range(20):
            f.write(json.dumps({"text": f"Document number {i}: " + SAMPLE_DOCS[i % len(SAMPLE_DOCS)]}) + "\n")
    return folder


@pytest.fixture
def feature_db(tiny_lm, doc_folder, tmp_path):
    """Two JumpReLU SAEs (resid.1, attn.0), saved, and their feature database over 10 rows of 32."""
    import numpy as np

    from saescope import CorpusConfig, JumpReLUSAE, SAEConfig, save_sae
    from saescope.data import token_rows
    from saescope.explore import build

    cfg = CorpusConfig(source=str(doc_folder), seq_len=32, split="all")
    rows = torch.from_numpy(np.stack(list(token_rows(tiny_lm, cfg))[:10]))
    saes = {}
    for site, d in (("resid.1", 32), ("attn.0", 48)):
        sae = JumpReLUSAE(SAEConfig(d_in=d, d_sae=24, site=site))
        sae.init_weights(torch.Generator().manual_seed(1))
        with torch.no_grad():
            sae.set_threshold(torch.full((24,), 0.05))
        saes[site] = (sae, save_sae(sae, tmp_path / "saes" / site))
    info = build(saes, tiny_lm, rows, tmp_path / "features.db", batch_size=3, top_k=5, sample=16, bands=4,
                 per_band=2, progress=False)
    return rows, saes, info, tmp_path / "features.db"


def save_tiny_model(folder, tokenizer=None):
    """The tiny Gemma 3 (the same weights as `tiny_lm`'s) saved as a model folder, as users pass one;
    without `tokenizer`, a folder with no tokenizer files."""
    tiny_model("gemma3").save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    return save_tiny_model(tmp_path / "model", tokenizer)


# SPEC §2's recipe (no longer the default): tests of Adam's own paths pin it
PAPER = {"optimizer": "adam", "lr_scale": "none", "loss": "mse"}


def planted(n=60_000, d=32, m=64, l0=4.0, seed=0):
    """x = codes @ D: m known unit directions, each token using about `l0` of them with size U(1, 3)."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    codes = (torch.rand(n, m, generator=g) < l0 / m) * (torch.rand(n, m, generator=g) * 2 + 1)
    return codes @ D, D, codes


def interrupt_training(monkeypatch, trainer_cls, step: int) -> None:
    """Make `trainer_cls` stop with KeyboardInterrupt (a Ctrl-C) as it starts `step`."""
    real = trainer_cls.train_step

    def dying(self, batch):
        if self.step == step:
            raise KeyboardInterrupt
        return real(self, batch)

    monkeypatch.setattr(trainer_cls, "train_step", dying)


def assert_resumes_exactly(cfg, root, source, monkeypatch, kill_at: int):
    """Train `cfg` whole into root/whole, and killed as it starts step `kill_at`, then rerun, into
    root/cut; every SAE of the two runs must have the same weights. Returns root/whole/saes."""
    from saescope import load_dictionary
    from saescope.train import Trainer, train

    train(cfg, root / "whole", source=source, progress=False)
    interrupt_training(monkeypatch, Trainer, kill_at)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, root / "cut", source=source, progress=False)
    monkeypatch.undo()
    assert not (root / "cut" / "saes").exists()
    train(cfg, root / "cut", source=source, progress=False)
    folders = sorted((root / "whole" / "saes").iterdir())
    assert [f.name for f in folders] == sorted(f.name for f in (root / "cut" / "saes").iterdir())
    for folder in folders:
        whole, cut = load_dictionary(folder).state_dict(), load_dictionary(root / "cut" / "saes" / folder.name).state_dict()
        for k, v in whole.items():
            torch.testing.assert_close(cut[k], v, rtol=1e-6, atol=1e-7, msg=f"{folder.name} {k}")
    return root / "whole" / "saes"


@pytest.fixture
def run_config(model_dir, tmp_path, doc_folder):
    """`tmp_path/run.toml`: the whole pipeline on a tiny Gemma 3 saved to a folder, in seconds."""
    model = model_dir
    corpus = f'corpus = {{ source = "{doc_folder}", seq_len = 32, holdout_fraction = 0.3 }}'
    path = tmp_path / "run.toml"
    path.write_text(f"""
[harvest]
model = "{model}"
sites = ["resid.1", "mlp_in.1", "mlp.1"]
tokens = 1024
{corpus}

[train]
tokens = 2048
batch_size = 128
lr = 1e-3
[[train.saes]]
sites = ["resid.1"]
widths = [16, 32]
lambdas = [1e-3, 1e-2]
[[train.saes]]
sites = ["resid.1"]
arch = "topk"
widths = [32]
ks = [4]
[[train.saes]]
sites = ["mlp_in.1"]
transcoder = true
widths = [32]

[eval]
tokens = 192
seq_len = 32

[explore]
tokens = 256
seq_len = 32
""")
    return path


def tiny_transcoders(lm, width: int = 24, skip: tuple[int, ...] = (1,), seed: int = 0) -> list:
    """A random JumpReLU transcoder per layer of `lm` (a skip at the layers in `skip`), wide enough
    encoders that a few dozen latents fire on a short prompt."""
    from saescope import JumpReLUSAE, SAEConfig

    gen = torch.Generator().manual_seed(seed)
    d, out = lm.d_model, []
    for layer in range(lm.n_layers):
        sae = JumpReLUSAE(SAEConfig(d_in=d, d_sae=width, d_out=d, site=f"mlp_in.{layer}", target_site=f"mlp.{layer}",
                                    skip=layer in skip, model=lm.name))
        sae.init_weights(gen)
        with torch.no_grad():
            sae.W_enc.mul_(3.0)
            sae.b_enc.normal_(0, 0.1, generator=gen)
            sae.b_dec.normal_(0, 0.1, generator=gen)
            if sae.cfg.skip:
                sae.W_skip.normal_(0, 0.1, generator=gen)
        out.append(sae)
    return out


def gemma_scope_2_tree(root: Path, d: int = 32, width: int = 64, seed: int = 0) -> dict[str, Path]:
    """A release tree written from SPEC §8's description alone (no saescope code, no saescope keys):
    an SAE, a transcoder and a skip transcoder at layer 1 of a d-wide Gemma."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    made = {}
    for folder, kind, point_in, point_out, affine in [
            ("resid_post/layer_1_width_64_l0_small", "sae", "model.layers.1.output", "model.layers.1.output", None),
            ("transcoder/layer_1_width_64_l0_medium", "transcoder", "model.layers.1.pre_feedforward_layernorm.output",
             "model.layers.1.post_feedforward_layernorm.output", False),
            ("transcoder/layer_1_width_64_l0_big_affine", "transcoder", "model.layers.1.pre_feedforward_layernorm.output",
             "model.layers.1.post_feedforward_layernorm.output", True)]:
        path = root / folder
        path.mkdir(parents=True)
        params = {"w_enc": torch.randn(d, width, generator=gen) / d ** 0.5, "w_dec": torch.randn(width, d, generator=gen) * 0.1,
                  "b_enc": torch.randn(width, generator=gen) * 0.1, "b_dec": torch.randn(d, generator=gen) * 0.1,
                  "threshold": torch.rand(width, generator=gen) * 0.3}
        config = {"width": width, "model_name": "google/gemma-3-270m-pt", "architecture": "jump_relu",
                  "l0": {"small": 20, "medium": 60, "big": 150}[folder.split("_l0_")[1].split("_")[0]], "type": kind,
                  "hf_hook_point_in": point_in, "hf_hook_point_out": point_out}
        if affine is not None:
            config["affine_connection"] = affine
        if affine:
            params["affine_skip_connection"] = torch.randn(d, d, generator=gen) * 0.1
        save_file(params, path / "params.safetensors")
        (path / "config.json").write_text(json.dumps(config))
        made[folder] = path
    return made
