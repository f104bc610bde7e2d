"""A causal LM with its tokenizer and a map from its decoder blocks to the four SAE sites.

The map is found from the blocks' structure, not the class name, so Gemma 2/3, Llama-, Qwen-,
Mistral-, GPT-NeoX- and GPT-2-style models share one code path."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SaescopeError

_LAYER_PATHS = ("model.layers", "model.language_model.layers", "language_model.model.layers",
                "model.model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers")


@dataclass(frozen=True)
class BlockMap:
    """Where, inside one decoder block, each site lives.

    `attn` is read at the *input* of the attention output projection (heads concatenated);
    `mlp` and `mlp_in` at the *output* of the named submodule; `resid` is the block's output.
    `ffn` is the feed-forward network itself, between `mlp_in` and `mlp`."""

    style: str
    attn: str
    mlp: str
    mlp_in: str
    ffn: str = "mlp"


# Checked in order: the first whose submodules all exist in block 0 wins.
_STYLES = (
    # Gemma 2 / 3: RMSNorm before and after both sublayers; mlp is what is added to the residual.
    BlockMap("gemma", attn="self_attn.o_proj", mlp="post_feedforward_layernorm", mlp_in="pre_feedforward_layernorm"),
    # Llama, Mistral, Qwen 2/3 (and GPT-NeoX): post_attention_layernorm is the pre-MLP norm.
    BlockMap("llama", attn="self_attn.o_proj", mlp="mlp", mlp_in="post_attention_layernorm"),
    BlockMap("neox", attn="attention.dense", mlp="mlp", mlp_in="post_attention_layernorm"),
    BlockMap("gpt2", attn="attn.c_proj", mlp="mlp", mlp_in="ln_2"),
)


# attention implementations that apply a soft cap (ours in circuits/local.py registers itself)
CAPPING_ATTENTION = {"eager", "flex_attention", "flash_attention_2", "flash_attention_3", "saescope_frozen_pattern"}


def _get(module: torch.nn.Module, path: str):
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


class LanguageModel:
    """A transformers causal LM plus tokenizer; calling it with token ids returns logits."""

    def __init__(self, model: torch.nn.Module, tokenizer=None, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name or type(model).__name__
        self.layers, self.block_map = self._find_blocks()
        self._keep_soft_caps()

    def _keep_soft_caps(self):
        """Gemma 2 soft-caps attention logits (tanh to ±cap); SDPA cannot, so a model built with it
        would fail or, elsewhere, skip the cap. Such a model runs eager attention instead."""
        attn = getattr(self.config, "_attn_implementation", None)
        if getattr(self.text_config, "attn_logit_softcapping", None) and attn not in CAPPING_ATTENTION:
            self.model.set_attn_implementation("eager")

    def _find_blocks(self):
        for path in _LAYER_PATHS:
            layers = _get(self.model, path)
            if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
                break
        else:
            raise SaescopeError(
                f"cannot map the blocks of {type(self.model).__name__}: no decoder layer list at any of "
                f"{', '.join(_LAYER_PATHS)}")
        for style in _STYLES:
            if all(_get(layers[0], p) is not None for p in (style.attn, style.mlp, style.mlp_in)):
                return layers, style
        children = ", ".join(name for name, _ in layers[0].named_children())
        raise SaescopeError(
            f"cannot map the blocks of {type(self.model).__name__}: block {type(layers[0]).__name__} has "
            f"[{children}], none of the known layouts ({', '.join(s.style for s in _STYLES)})")

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def config(self):
        return self.model.config

    @property
    def text_config(self):
        """The language model's own config (a multimodal model's text part)."""
        return getattr(self.config, "text_config", None) or self.config

    @property
    def parallel_residual(self) -> bool:
        """Whether attention and MLP both read the block's input (GPT-NeoX's default): no resid_mid."""
        return bool(getattr(self.text_config, "use_parallel_residual", False))

    @property
    def d_model(self) -> int:
        cfg = self.text_config
        return getattr(cfg, "hidden_size", None) or cfg.n_embd

    @property
    def attn_width(self) -> int:
        """Width of the concatenated head outputs (the `attn` site), read off the output projection."""
        proj = _get(self.layers[0], self.block_map.attn)
        if isinstance(proj, torch.nn.Linear):
            return proj.in_features
        return proj.weight.shape[0]  # GPT-2's Conv1D stores (in, out)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __call__(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.model(input_ids=input_ids.to(self.device), use_cache=False, **kwargs).logits

    def __repr__(self) -> str:
        return f"LanguageModel({self.name!r}, {self.n_layers} layers, d_model {self.d_model}, {self.block_map.style} blocks)"
