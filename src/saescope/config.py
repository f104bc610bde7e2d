"""Typed configuration, one object per pipeline stage, validated where it enters (CLI or file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import SaescopeError, first_line

BUILTIN_CORPUS = "python-docs"


def _site_list(value) -> list[str]:
    from .site import parse_sites

    try:
        return [str(s) for s in parse_sites(value)]
    except SaescopeError as exc:  # as a ValueError, pydantic names the field
        raise ValueError(str(exc)) from None


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(_Config):
    """Which text, in which order, and which documents are held out for evaluation."""

    source: str = Field(BUILTIN_CORPUS, description=f"'{BUILTIN_CORPUS}', a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG]")
    text_field: str = Field("text", description="the text column of .jsonl/.parquet files and datasets")
    hf_split: str = Field("train", description="split of a Hugging Face dataset")
    split: Literal["train", "heldout", "all"] = Field("train", description="'heldout' is the held-out documents")
    holdout_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents (by text hash) held out")
    seed: int = Field(0, description="document shuffle seed")
    shuffle_documents: int = Field(10_000, ge=0, description="document shuffle buffer (0 keeps corpus order)")
    seq_len: int = Field(1024, ge=2, description="tokens per packed row, BOS included")


class HarvestConfig(_Config):
    """Model → activation store: which sites, how many tokens, how they are written."""

    model: str = "gemma-3-270m-q4km"
    sites: list[str] = Field(default_factory=lambda: ["resid.6"])
    tokens: int = Field(100_000, gt=0, description="tokens to run through the model (rows = tokens minus BOS/EOS/pad)")
    batch_size: int = Field(4, gt=0, description="sequences per forward pass")
    dtype: Literal["float32", "bfloat16"] = Field("float32", description="stored activation dtype")
    model_dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="the model's weights")
    shard_mb: float = Field(128.0, gt=0, description="target shard size in MiB")
    device: str = "cpu"
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)

    _sites = field_validator("sites", mode="before")(lambda v: _site_list(v))


# the quadratic penalty's default coefficient: on Gemma 3 270M every λ from 0.01 to 1 held the target
# L0 (README: Optimizer and learning rate); on planted dictionaries 0.1 settled above it and 1 on it
QUADRATIC_LAMBDA = 1.0
# the norm cap's default, by bench/quality.py (README: Dictionary quality): it lowered both TopK's and
# JumpReLU's delta loss on held-out and out-of-distribution text; 2 and 10 bracketed it
NORM_CAP = 5.0
# BatchTopK's (and a JumpReLU trained as it): every row above the median weighs as if at it. BatchTopK
# shares the batch's k·B latents among its rows by size, and a row's weight in the loss decides how
# many it draws; TopK, with k per row, did worse at 1 than at 5 (README: Dictionary quality)
BATCHTOPK_NORM_CAP = 1.0
# what a JumpReLU target L0 brings unless the entry sets it (λ only with the quadratic penalty)
TARGET_RECIPE = {"sparsity": "quadratic", "threshold_init": "quantile", "lambdas": [QUADRATIC_LAMBDA]}
# the settings that only a JumpReLU trained as itself reads: an entry that sets one is trained so
JUMPRELU_TRAINING = ("sparsity", "lambdas", "threshold_init", "quadratic_form", "tanh_scale", "dead_aux", "input_ste",
                     "theta_param", "bandwidth")
# how a JumpReLU target L0 is trained unless the entry says (README: Dictionary quality)
TARGET_TRAIN_AS = "batchtopk"


# a crosscoder's sites unless the entry lists them: Gemma Scope 2's for Gemma 3 270M (25/50/65/85% depth)
CROSSCODER_SITES = ["resid.5", "resid.9", "resid.12", "resid.15"]


def default_norm_cap(arch: str | None, train_as: str | None) -> float:
    """The norm cap an entry of this kind gets unless it sets one."""
    return BATCHTOPK_NORM_CAP if "batchtopk" in (arch, train_as) else NORM_CAP


class SAESpec(_Config):
    """A family of SAEs on the same data: every site × width × (λ, k or target L0) combination."""

    sites: list[str] = Field(default_factory=lambda: ["resid.6"], description="input sites; for transcoders mlp_in.L (or ln2.L, before the norm's scale)")
    arch: Literal["jumprelu", "topk", "batchtopk", "relu"] = "jumprelu"
    widths: list[int] = Field(default_factory=lambda: [4096], description="numbers of latents")
    lambdas: list[float] = Field(default_factory=lambda: [6e-4], description="sparsity coefficients (jumprelu: L0, relu: L1; "
                                                                             "with target_l0 the quadratic penalty's, default 1)")
    ks: list[int] = Field(default_factory=lambda: [32], description="active latents per token (topk, batchtopk)")
    target_l0: list[float] = Field(default_factory=list, description="jumprelu: hold L0 at each of these (sparsity "
                                                                     "'quadratic' and threshold_init 'quantile' unless set)")
    transcoder: bool = Field(False, description="read mlp_in.L (or ln2.L) and predict mlp.L")
    skip: bool = Field(False, description="transcoders: an affine skip x·A (d_in × d_out) trained beside the dictionary")
    clt: bool = Field(False, description="one cross-layer transcoder over the sites (mlp_in.L): latents at each layer "
                                         "write that layer's MLP output and every later listed one's")
    crosscoder: bool = Field(False, description="one weakly causal crosscoder over the sites (resid.L; unless listed, "
                                                "Gemma Scope 2's for Gemma 3 270M, layers 5, 9, 12, 15): latents read "
                                                "one layer and write it and the later listed ones")
    init_from: list[str] = Field(default_factory=list, description="clt, crosscoder: a single-layer dictionary per site "
                                                                   "(paths, in the sites' order) each group starts from")
    init_decay_steps: int | None = Field(None, ge=0, description="with init_from: steps over which each layer's k or "
                                                                 "target L0 falls from its dictionary's L0 to the entry's; "
                                                                 "default min(50,000, 20% of the run)")
    theta_param: Literal["theta", "log"] = Field("theta", description="train θ directly or as log θ (the paper)")
    bandwidth: float = Field(0.001, gt=0, description="ε of the rectangle kernel")
    b_dec_init: Literal["mean", "zeros"] = Field("mean", description="the first batch's mean (measured better, see README) or zeros (the paper)")
    # the objective (sae/objectives.py)
    sparsity: Literal["l0", "quadratic", "tanh"] = Field(
        "l0", description="jumprelu: λ·L0 (Gemma Scope), λ·(L0 − L0*)²/(2·L0*) around each target_l0 (Gemma Scope 2), "
                          "or λ·Σ tanh(s·f)")
    quadratic_form: Literal["batch", "token"] = Field("batch", description="quadratic: of the batch's mean L0, or per token")
    tanh_scale: float = Field(4.0, gt=0, description="tanh: s in tanh(s·f)")
    frequency_penalty: float = Field(0.0, ge=0, description="jumprelu, topk, batchtopk: weight w of w·Σ max(0, p_i − τ), p_i latent i's firing share")
    frequency_threshold: float = Field(0.1, gt=0, lt=1, description="τ: the firing share above which a latent pays")
    matryoshka: list[int] = Field(default_factory=list, description="prefix widths that each reconstruct alone (the whole is implied last)")
    matryoshka_weights: list[float] = Field(default_factory=list, description="one per prefix and the whole (default equal, summing to 1)")
    dead_aux: float = Field(0.0, ge=0, description="jumprelu: weight of the AuxK-style loss on dead latents' pre-activations")
    input_ste: bool = Field(False, description="jumprelu: the threshold kernel's gradient also reaches the pre-activations")
    norm_cap: float = Field(NORM_CAP, ge=0, description=f"rows whose centred norm exceeds this × the batch median weigh "
                                                        f"in the reconstruction loss as if at it (Gemma's massive tokens); "
                                                        f"default {NORM_CAP:g}, batchtopk {BATCHTOPK_NORM_CAP:g}; 0: off")
    threshold_init: Literal["constant", "quantile"] = Field(
        "constant", description="jumprelu: θ = 0.001 (the paper), or per-latent quantiles of the first batch's "
                                "pre-activations, so that L0 starts at the target")
    train_as: Literal["jumprelu", "batchtopk"] = Field(
        "jumprelu", description="jumprelu with target_l0: trained as itself, or as BatchTopK at k = each target and "
                                "saved as JumpReLU with a threshold per latent from the last training rows (Gemma "
                                "Scope 2's route for some releases; the default for a target L0 unless the entry "
                                "sets a JumpReLU training option)")

    _sites = field_validator("sites", mode="before")(lambda v: _site_list(v))

    @model_validator(mode="before")
    @classmethod
    def _target_recipe(cls, data):
        """The defaults of a kind (README: Objectives): a JumpReLU target L0 trains as BatchTopK unless
        the entry sets a JumpReLU training option, and as JumpReLU it brings the recipe that holds
        it (Gemma Scope 2's quadratic penalty, which pulls L0 back from either side under any
        optimizer, with thresholds that start L0 at the target); BatchTopK brings its norm cap.
        Whatever the spec sets itself stays."""
        if isinstance(data, dict) and data.get("target_l0") and data.get("arch", "jumprelu") == "jumprelu":
            if "train_as" not in data:
                data = {**data, "train_as": "jumprelu" if any(k in data for k in JUMPRELU_TRAINING) else TARGET_TRAIN_AS}
            if data["train_as"] == "jumprelu":
                quadratic = data.get("sparsity", "quadratic") == "quadratic"
                data = {**{k: v for k, v in TARGET_RECIPE.items() if k != "lambdas" or quadratic}, **data}
        if isinstance(data, dict):
            data = {"norm_cap": default_norm_cap(data.get("arch"), data.get("train_as")), **data}
        if isinstance(data, dict) and data.get("crosscoder") and "sites" not in data:
            data = {**data, "sites": CROSSCODER_SITES}
        return data

    def is_default(self, name: str) -> bool:
        """Whether field `name` holds what an entry of this kind gets unless it says otherwise (a
        JumpReLU target L0's recipe, else the field's default): what an SAE's name need not say."""
        if self.target_l0 and self.arch == "jumprelu" and self.train_as == "jumprelu" and name in TARGET_RECIPE:
            return getattr(self, name) == TARGET_RECIPE[name]
        if name == "norm_cap":
            return self.norm_cap == default_norm_cap(self.arch, self.train_as)
        return getattr(self, name) == type(self).model_fields[name].get_default(call_default_factory=True)

    @model_validator(mode="after")
    def _objective_fits(self):
        jumprelu_only = [name for name, on in (("sparsity", self.sparsity != "l0"), ("dead_aux", self.dead_aux),
                                               ("input_ste", self.input_ste),
                                               ("threshold_init", self.threshold_init != "constant")) if on]
        if self.arch != "jumprelu" and jumprelu_only:
            raise ValueError(f"{', '.join(jumprelu_only)} {'is' if len(jumprelu_only) == 1 else 'are'} for jumprelu SAEs, not {self.arch}")
        if self.multi_layer:
            self._multi_layer_fits()
        elif self.init_from:
            raise ValueError("init_from starts a clt's or crosscoder's groups from single-layer dictionaries; "
                             "set clt or crosscoder")
        if self.skip and not self.transcoder:
            raise ValueError("skip is for transcoders (an SAE's skip would copy its input): set transcoder = true")
        if self.arch == "relu" and self.frequency_penalty:
            raise ValueError("frequency_penalty is for jumprelu, topk and batchtopk SAEs, not relu (its L1 penalty already reaches every latent)")
        if self.train_as == "batchtopk":
            self._trains_as_batchtopk()
        if self.sparsity == "quadratic" and not self.target_l0:
            raise ValueError("sparsity 'quadratic' penalises the distance to each target_l0: set target_l0")
        if self.threshold_init == "quantile" and not self.target_l0:
            raise ValueError("threshold_init 'quantile' starts L0 at the target: set target_l0")
        try:  # the objective's own checks, here where the config is read
            self.objective(self.target_l0[0] if self.target_l0 else None).check_width(min(self.widths))
        except SaescopeError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def multi_layer(self) -> str | None:
        """"clt" or "crosscoder" for an entry that is one multi-layer dictionary over its sites."""
        return "clt" if self.clt else "crosscoder" if self.crosscoder else None

    def _multi_layer_fits(self) -> None:
        from .sae.multilayer import KINDS
        from .site import Site

        kind = self.multi_layer
        if self.clt and self.crosscoder:
            raise ValueError("an entry is a clt or a crosscoder, not both")
        clash = [name for name, on in (("transcoder", self.transcoder), ("skip", self.skip),
                                       ("matryoshka", bool(self.matryoshka)), ("arch 'relu'", self.arch == "relu")) if on]
        if clash:
            raise ValueError(f"{', '.join(clash)} {'is' if len(clash) == 1 else 'are'} for single-layer dictionaries, not a {kind}")
        sites = [Site.parse(s) for s in self.sites]
        if any(s.kind != KINDS[kind][0] for s in sites):
            raise ValueError(f"a {kind} reads {KINDS[kind][0]}.L sites, got {', '.join(self.sites)}")
        layers = [s.layer for s in sites]
        if layers != sorted(set(layers)):
            raise ValueError(f"a {kind}'s sites must be distinct layers in increasing order, got {', '.join(self.sites)}")
        if self.init_from and len(self.init_from) != len(self.sites):
            raise ValueError(f"init_from lists one dictionary per site: {len(self.sites)} sites, {len(self.init_from)} given")

    def _trains_as_batchtopk(self) -> None:
        if self.arch != "jumprelu" or not self.target_l0:
            raise ValueError("train_as 'batchtopk' is for jumprelu entries with target_l0 (k = each target)")
        set_ = [n for n in JUMPRELU_TRAINING if n in self.model_fields_set and not self.is_default(n)]
        if set_:
            raise ValueError(f"train_as 'batchtopk' trains no thresholds, so {', '.join(set_)} would be ignored; "
                             f"drop {'it' if len(set_) == 1 else 'them'} or set train_as 'jumprelu'")
        fractional = [t for t in self.target_l0 if not float(t).is_integer()]
        if fractional:
            raise ValueError(f"train_as 'batchtopk' trains at k = each target_l0, which must be whole: {fractional} (or set train_as 'jumprelu')")

    def objective(self, target_l0: float | None = None):
        """The training objective of this family's SAE at `target_l0` (sae/objectives.py)."""
        from dataclasses import fields

        from .sae.objectives import Objective

        same = {f.name: getattr(self, f.name) for f in fields(Objective) if f.name != "target_l0"}  # the spec's own keys
        return Objective(**{k: tuple(v) if isinstance(v, list) else v for k, v in same.items()}, target_l0=target_l0)

    @field_validator("widths", "ks")
    @classmethod
    def _positive(cls, v: list[int]) -> list[int]:
        if not v or any(x <= 0 for x in v):
            raise ValueError("must be a non-empty list of positive integers")
        return v


class ParallelConfig(_Config):
    """How a torchrun job (WORLD_SIZE > 1) shares the work; one process ignores all but data_parts."""

    mode: Literal["data", "sae"] = Field(
        "data", description="data: every rank trains every SAE on its share of each batch, gradients all-reduced; "
                            "sae: the suite's SAEs are spread over the ranks, each trained on whole batches")
    data_parts: int | None = Field(
        None, gt=0, description="each global batch is the union of this many independently shuffled parts (default: "
                                "the number of ranks; 1 when SAE-sharded ranks read a store); fixed for a run, so "
                                "it may resume on any rank count that divides it")
    timeout_s: float = Field(600.0, gt=0, description="a collective waiting longer than this ends the job "
                                                      "(a hung or lost rank)")


# the learning rates by optimizer: Adam's is the paper's (SPEC §2); signum's, with lr_scale "width",
# sparsify's (README: Optimizer and learning rate)
SIGNUM_LR, ADAM_LR = 5e-3, 7e-5


class TrainConfig(_Config):
    """Activations → SAEs: the data source, the suite, and the recipe (defaults by measurement,
    README: Optimizer and learning rate; optimizer = "adam", lr_scale = "none", loss = "mse" is SPEC §2's)."""

    store: str | None = Field(None, description="activation store folder (else stream from `harvest`)")
    harvest: HarvestConfig | None = Field(None, description="stream activations from a model, no disk")
    saes: list[SAESpec] = Field(default_factory=lambda: [SAESpec()])
    tokens: int = Field(1_000_000, gt=0, description="training tokens (steps = tokens // batch_size)")
    batch_size: int = Field(4096, gt=0)
    lr: float = Field(SIGNUM_LR, gt=0, description=f"default by optimizer: signum {SIGNUM_LR}, adam {ADAM_LR} (the paper)")
    lr_warmup_steps: int | None = Field(None, ge=0, description="cosine warm-up from 0.1·lr; default min(1000, 5% of steps)")
    lambda_warmup_steps: int | None = Field(None, ge=0, description="linear λ warm-up from 0; default min(10000, 20% of steps)")
    optimizer: Literal["adam", "signum"] = Field(
        "signum", description="adam (the paper: β1 = 0), or signum: the gradient's sign under a schedule-free average "
                            "(sparsify's default; the saved SAE is the average)")
    momentum: float = Field(0.95, gt=0, lt=1, description="signum: the schedule-free interpolation β")
    lr_scale: Literal["none", "width"] = Field("width", description="width: each SAE's lr × (2^14 / width)^0.5 (sparsify's rule)")
    loss: Literal["mse", "fvu"] = Field("fvu", description="fvu: the objective divided by the batch's total variance, "
                                                           "so its scale does not depend on the activations'")
    adam_beta1: float = Field(0.0, ge=0, lt=1)
    adam_beta2: float = Field(0.999, ge=0, lt=1)
    adam_eps: float = Field(1e-8, gt=0)
    target_l0_gain: float = Field(0.03, gt=0, description="target-L0 mode: step of log λ per unit of log(L0/target)")
    dead_tokens: int | None = Field(None, gt=0, description="a latent unfired this long is dead; default min(10M, tokens/10)")
    buffer_rows: int | None = Field(None, gt=0, description="shuffle buffer rows (default ~10^6 or what memory allows)")
    seed: int = 0
    checkpoint_every: int = Field(500, ge=0, description="steps between checkpoints (0: only at the end)")
    log_every: int = Field(10, gt=0, description="steps between metrics lines")
    device: str = "cpu"
    precision: Literal["float32", "bfloat16", "tf32"] = Field(
        "float32", description="the products' dtype: bfloat16 autocast keeps float32 master weights, optimizer and "
                               "thresholds; tf32 (CUDA only) lets float32 products use TensorFloat-32")
    kernels: Literal["auto", "dense", "sparse", "reference"] = Field(
        "auto", description="training-step path: auto (sparse once few latents fire), dense, sparse, or the plain reference")
    parallel: ParallelConfig = Field(default_factory=ParallelConfig, description="torchrun jobs: data or SAE parallel")
    backend: Literal["torch", "jax"] = Field("torch", description="jax: JumpReLU SAEs and transcoders stepped in JAX "
                                                                  "(pip install 'saescope[jax]')")

    @model_validator(mode="before")
    @classmethod
    def _lr_of_optimizer(cls, data):
        """Each optimizer's own learning rate unless one is set: a sign step and Adam's step differ
        in size by orders of magnitude, so one default cannot serve both."""
        if isinstance(data, dict) and data.get("lr") is None:
            data = {**data, "lr": ADAM_LR if data.get("optimizer") == "adam" else SIGNUM_LR}
        return data

    @model_validator(mode="after")
    def _tf32_on_cuda(self):
        if self.precision == "tf32" and not self.device.startswith("cuda"):
            raise ValueError(f"precision 'tf32' is a CUDA tensor-core format, not for device '{self.device}'; "
                             "on the CPU use bfloat16")
        return self

    @model_validator(mode="after")
    def _target_held(self):
        """Target-L0 mode under the linear or tanh penalty steers λ, and under signum λ only tips
        the sign of θ's gradient: once L0 is below the target no λ raises it, so the quadratic
        penalty, which pulls both ways, is what holds it there (README: Optimizer and learning rate)."""
        steered = [s.sparsity for s in self.saes
                   if s.arch == "jumprelu" and s.train_as == "jumprelu" and s.target_l0 and s.sparsity != "quadratic"]
        if self.optimizer == "signum" and steered:
            raise ValueError(f"target_l0 with sparsity '{steered[0]}' steers λ, which signum's sign steps cannot follow "
                             "below the target; use sparsity = 'quadratic' (or optimizer = 'adam')")
        return self


def read_config_file(path: str | Path) -> dict:
    """A .toml or .json file as a dict, or a one-line error naming the file."""
    path = Path(path)
    if not path.is_file():
        raise SaescopeError(f"config file not found: {path}")
    try:
        if path.suffix == ".toml":
            if sys.version_info >= (3, 11):
                import tomllib
            else:
                import tomli as tomllib
            return tomllib.loads(path.read_text())
        if path.suffix == ".json":
            values = json.loads(path.read_text())
            if not isinstance(values, dict):
                raise SaescopeError(f"config {path} must hold an object of settings, not {type(values).__name__}")
            return values
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError and TOMLDecodeError are ValueErrors
        raise SaescopeError(f"config {path} cannot be parsed: {first_line(exc)}") from None
    raise SaescopeError(f"config {path}: use a .toml or .json file")


def config_from_file(cls: type[_Config], path: str | Path, **overrides) -> _Config:
    """`cls` from a config file, with `overrides` (e.g. from flags) on top, table by table (a flag
    sets one key of a table such as [parallel] and keeps the file's others); misspelt keys are errors."""
    values = read_config_file(path)
    for key, value in overrides.items():
        values[key] = {**values[key], **value} if isinstance(value, dict) and isinstance(values.get(key), dict) else value
    try:
        return cls(**values)
    except ValidationError as exc:
        raise SaescopeError(f"config {path}: " + one_line(exc, cls.__name__)) from None


def validated(cls: type[_Config], **values) -> _Config:
    """Build a config, turning pydantic's multi-line report into one SaescopeError line."""
    try:
        return cls(**values)
    except ValidationError as exc:
        raise SaescopeError(one_line(exc, cls.__name__)) from None


def one_line(exc: ValidationError, what: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or what
        msg = err["msg"].removeprefix("Value error, ")
        shown = err["type"] != "extra_forbidden" and err["loc"]  # a whole-config check would echo all of it
        parts.append(f"{loc}: {msg}" + (f" (got {err['input']!r})" if shown else ""))
    return f"invalid {what}: " + "; ".join(parts)
