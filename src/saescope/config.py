"""Typed configuration, one object per pipeline stage, validated where it enters (CLI or file)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SaescopeError

BUILTIN_CORPUS = "python-docs"
DTYPES = ("float32", "bfloat16")


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CorpusConfig(_Config):
    """Which text, in which order, and which documents are held out for evaluation."""

    source: str = Field(BUILTIN_CORPUS, description=f"'{BUILTIN_CORPUS}', a .txt/.jsonl/.parquet file or folder, or hf:NAME[:CONFIG]")
    text_field: str = Field("text", description="the text column of .jsonl/.parquet files and datasets")
    hf_split: str = Field("train", description="split of a Hugging Face dataset")
    split: str = Field("train", description="'train', 'heldout' (the held-out documents) or 'all'")
    holdout_fraction: float = Field(0.05, ge=0.0, lt=1.0, description="share of documents (by text hash) held out")
    seed: int = Field(0, description="document shuffle seed")
    shuffle_documents: int = Field(10_000, ge=0, description="document shuffle buffer (0 keeps corpus order)")
    seq_len: int = Field(1024, ge=2, description="tokens per packed row, BOS included")

    @field_validator("split")
    @classmethod
    def _split(cls, v: str) -> str:
        if v not in ("train", "heldout", "all"):
            raise ValueError("must be 'train', 'heldout' or 'all'")
        return v


class HarvestConfig(_Config):
    """Model → activation store: which sites, how many tokens, how they are written."""

    model: str = "gemma-3-270m"
    sites: list[str] = Field(default_factory=lambda: ["resid.6"])
    tokens: int = Field(100_000, gt=0, description="tokens to run through the model (rows = tokens minus BOS/EOS/pad)")
    batch_size: int = Field(4, gt=0, description="sequences per forward pass")
    dtype: str = Field("float32", description="stored activation dtype: float32 or bfloat16")
    shard_mb: float = Field(128.0, gt=0, description="target shard size in MiB")
    device: str = "cpu"
    corpus: CorpusConfig = Field(default_factory=CorpusConfig)

    @field_validator("sites", mode="before")
    @classmethod
    def _sites(cls, v):
        from .site import parse_sites

        return [str(s) for s in parse_sites(v)]

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"must be one of {', '.join(DTYPES)}")
        return v


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
        parts.append(f"{loc}: {msg}" + (f" (got {err['input']!r})" if err["type"] != "extra_forbidden" else ""))
    return f"invalid {what}: " + "; ".join(parts)
