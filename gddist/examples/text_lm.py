"""experiment=text_lm: a character-level transformer language model on Python's own source.

The text is the concatenated source of `MODULES`, a fixed list of pure-Python standard-library
modules, read from the files `importlib.util.find_spec(name).origin` names (no import, no
download). It ships with Python, so it is deterministic for a given Python version, and it VARIES
with the version: another Python reads other source, and every number of this preset moves a
little with it (docs/examples/text_lm.md says which version the README numbers come from).

Split: contiguous, the first `1 - val_fraction` of the characters train, the last `val_fraction`
validate (the tail of the last module), so the val text is text the model never read. The
vocabulary is the sorted set of the TRAIN characters after id 0, which is reserved for a
character the train text lacks (`UNK`): a val character unseen in training reads as 0.

Samples are windows by index: sample i of a split is `ids[i*stride : i*stride + context + 1]`,
as `{"input_ids": window[:-1], "labels": window[1:]}`: labels are already shifted (labels[t] is
the character after input_ids[t]), unlike Hugging Face causal LMs, which shift inside the model.
Validation windows use stride = context, so each val character after the first is scored once.

The model, `CharTransformer`, is a nanoGPT-style decoder (token + position embeddings, pre-norm
blocks of causal self-attention and an MLP, a final LayerNorm and a linear head) whose
`forward(input_ids, labels=None)` returns `CausalLMOutput(loss, logits)` (loss=model): the loss
is the mean cross-entropy over every position of the batch, in nats per character, so val/loss
is nats/char and val/perplexity (torchmetrics' Perplexity, metrics.extra) is exp(val/loss).

`on_end` compares it with a unigram and a bigram model (add-one smoothing, fit on the train
text) on exactly the positions val/loss scored, and writes a greedy sample from a fixed prompt
to RUN_DIR/plots/sample.txt (and prints it).
"""

from __future__ import annotations

import functools
import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

from gddist.config import UserError

# Pure-Python modules present in every CPython 3.x this project supports, none of them frozen
# (a frozen module, e.g. abc in 3.11, has no source file). About 467k characters on 3.11; the
# last 10% (val) is the end of argparse.
MODULES = (
    "string",
    "textwrap",
    "pprint",
    "calendar",
    "contextlib",
    "functools",
    "dataclasses",
    "difflib",
    "enum",
    "argparse",
)
UNK = 0  # the id of a character the train text lacks
PROMPT = "    def __init__(self"  # the sample's fixed prompt: every character occurs in argparse
SAMPLE_CHARS = 200

REPORT = {
    "task": "character-level language model (Python standard-library source)",
    "metric": "val/loss",
    "baselines": {
        "baseline/bigram": "bigram, add-one (nats/char)",
        "baseline/unigram": "unigram, add-one (nats/char)",
    },
}


# --------------------------------------------------------------------------- the text


@dataclass(frozen=True)
class Corpus:
    """The split text and its vocabulary: `chars[k]` is the character of id k (k >= 1)."""

    train: str
    val: str
    chars: str  # sorted train characters; id = position + 1 (0 is UNK)

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 1

    def encode(self, text: str) -> torch.Tensor:
        stoi = {c: i + 1 for i, c in enumerate(self.chars)}
        return torch.tensor([stoi.get(c, UNK) for c in text], dtype=torch.long)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[i - 1] if i > 0 else "\N{REPLACEMENT CHARACTER}" for i in ids)


def read_source(modules: Sequence[str]) -> str:
    """The source files of `modules`, concatenated in order (one newline between files)."""
    texts = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        origin = None if spec is None else spec.origin
        if origin is None or not Path(origin).is_file():
            raise UserError(
                f"text_lm: the standard-library module {name!r} has no source file in this "
                f"Python ({origin or 'not found'}); choose modules with a .py file "
                "(data.train.modules / data.val.modules)"
            )
        texts.append(Path(origin).read_text(encoding="utf-8"))
    return "\n".join(texts)


@functools.lru_cache(maxsize=4)
def load_corpus(modules: tuple[str, ...] = MODULES, val_fraction: float = 0.1) -> Corpus:
    """The text of `modules`, split contiguously: the last `val_fraction` is val. Cached: the
    train and val Datasets and the model's vocabulary size read it once per process."""
    if not 0 < val_fraction < 1:
        raise UserError(f"text_lm: val_fraction={val_fraction} must be between 0 and 1")
    text = read_source(modules)
    cut = int(len(text) * (1 - val_fraction))
    train, val = text[:cut], text[cut:]
    return Corpus(train=train, val=val, chars="".join(sorted(set(train))))


class CharWindows(Dataset):
    """Windows of `context + 1` character ids of one split: sample i is
    `{"input_ids": ids[s : s + context], "labels": ids[s + 1 : s + context + 1]}` with
    s = i * stride (default stride: 1 for train, every window start; `context` for val, each
    character scored once). No randomness: a sample is a pure function of its index."""

    def __init__(
        self,
        split: str = "train",
        modules: Sequence[str] = MODULES,
        val_fraction: float = 0.1,
        context: int = 64,
        stride: int | None = None,
    ) -> None:
        if split not in ("train", "val"):
            raise ValueError(f"no split {split!r}; choose train or val")
        self.corpus = load_corpus(tuple(modules), val_fraction)
        self.ids = self.corpus.encode(getattr(self.corpus, split))
        self.context = context
        self.stride = stride or (1 if split == "train" else context)
        if len(self.ids) < context + 1:
            raise ValueError(f"the {split} text has {len(self.ids)} characters < context + 1")

    def __len__(self) -> int:
        return (len(self.ids) - self.context - 1) // self.stride + 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        window = self.ids[i * self.stride : i * self.stride + self.context + 1]
        return {"input_ids": window[:-1], "labels": window[1:]}


# --------------------------------------------------------------------------- the model


@dataclass
class CausalLMOutput:
    """What `CharTransformer.forward` returns (the Hugging Face convention loss=model reads)."""

    loss: torch.Tensor | None
    logits: torch.Tensor  # [batch, time, vocab]


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions <= t only."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        if d_model % n_head:
            raise ValueError(f"d_model={d_model} is not a multiple of n_head={n_head}")
        self.n_head = n_head
        # No bias: a key bias adds q.b to every score of a query, which the softmax ignores, so
        # its gradient is exactly zero but for float noise, and Adam would scale that noise up
        # to lr-sized steps (runs that differ only in reduction order would then drift apart).
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        # Dropout on the output only, not on the attention weights: on CPU drawing a [B, heads,
        # T, T] mask costs as much as the rest of the step, for no gain in a sub-epoch run.
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # [B, T, C] -> [B, heads, T, C / heads]
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d_model: int, n_head: int, dropout: float) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_head, dropout)
        self.ln2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model),
            nn.GELU(),
            nn.Linear(4 * d_model, d_model),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class CharTransformer(nn.Module):
    """A small GPT over character ids: `forward(input_ids [B, T], labels [B, T] | None)` ->
    `CausalLMOutput(loss, logits)`, loss the mean cross-entropy over all B*T positions (None
    without labels). T may be at most `context`."""

    def __init__(
        self,
        vocab_size: int,
        context: int = 64,
        n_layer: int = 2,
        n_head: int = 4,
        d_model: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.context = context
        self.tok_emb = nn.Embedding(vocab_size, d_model)
        self.pos_emb = nn.Embedding(context, d_model)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(d_model, n_head, dropout) for _ in range(n_layer))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size)

    def forward(
        self, input_ids: torch.Tensor, labels: torch.Tensor | None = None
    ) -> CausalLMOutput:
        length = input_ids.shape[1]
        if length > self.context:
            raise ValueError(f"{length} ids are more than the context of {self.context}")
        pos = torch.arange(length, device=input_ids.device)
        x = self.drop(self.tok_emb(input_ids) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return CausalLMOutput(loss=loss, logits=logits)

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, new: int) -> torch.Tensor:
        """`ids` [T0] followed by `new` greedily chosen ids (each the argmax given the last
        `context` ids)."""
        out = ids.clone()
        for _ in range(new):
            logits = self(out[-self.context :].unsqueeze(0)).logits
            out = torch.cat([out, logits[0, -1].argmax().view(1)])
        return out


def char_transformer(
    modules: Sequence[str] = MODULES, val_fraction: float = 0.1, **kwargs: Any
) -> CharTransformer:
    """model._target_: a CharTransformer whose vocabulary is that of the train text of
    (`modules`, `val_fraction`), the same the data reads (the preset interpolates both from
    data.train); `kwargs` are CharTransformer's other arguments."""
    return CharTransformer(load_corpus(tuple(modules), val_fraction).vocab_size, **kwargs)


# --------------------------------------------------------------------------- baselines, sample


def ngram_baselines(corpus: Corpus, val: CharWindows) -> dict[str, float]:
    """Cross-entropy (nats/char) of add-one-smoothed unigram and bigram models fit on the train
    text, on exactly the (previous, next) pairs the val windows score: every label of every
    window, the bigram conditioned on the input id at the same position."""
    V = corpus.vocab_size
    train = corpus.encode(corpus.train)
    uni = torch.bincount(train, minlength=V).double() + 1
    log_uni = (uni / uni.sum()).log()
    bi = torch.bincount(train[:-1] * V + train[1:], minlength=V * V).double().view(V, V) + 1
    log_bi = (bi / bi.sum(1, keepdim=True)).log()
    prev = torch.stack([val[i]["input_ids"] for i in range(len(val))]).flatten()
    nxt = torch.stack([val[i]["labels"] for i in range(len(val))]).flatten()
    return {
        "baseline/unigram": -log_uni[nxt].mean().item(),
        "baseline/bigram": -log_bi[prev, nxt].mean().item(),
    }


def on_end(run_dir: Path, cfg: dict[str, Any], model: nn.Module) -> dict[str, float]:
    """logger.on_end (rank 0, model in eval mode): the n-gram baselines on the run's val windows,
    and a greedy sample of `SAMPLE_CHARS` characters after `PROMPT`, written to
    RUN_DIR/plots/sample.txt and printed."""
    from gddist.data.dataset import instantiate

    val = instantiate("data.val", cfg["data"]["val"])
    corpus = val.corpus
    result = ngram_baselines(corpus, val)
    device = next(model.parameters()).device
    prompt = corpus.encode(PROMPT).to(device)
    sample = corpus.decode(model.generate(prompt, SAMPLE_CHARS).tolist())
    plots = Path(run_dir) / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    (plots / "sample.txt").write_text(sample + "\n", encoding="utf-8")
    print(f"text_lm: greedy sample ({SAMPLE_CHARS} characters after {PROMPT!r}):\n{sample}")
    result["baseline/bigram_perplexity"] = math.exp(result["baseline/bigram"])
    return result
