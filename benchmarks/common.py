"""What the benchmark scripts share: the import path, random models of real shapes, timing, the machine line
and RESULTS.md. Each script imports this module and nothing from the others."""

from __future__ import annotations

import datetime
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from softtokens.data import load_dataset  # noqa: E402
from softtokens.models import CausalLM  # noqa: E402
from softtokens.prompts import PROMPT_TEMPLATE, format_prompt  # noqa: E402

SHAPES = {
    "qwen2.5-3b": dict(family="qwen2", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True,
                       rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768),
    "llama-3.2-3b": dict(family="llama", hidden_size=3072, intermediate_size=8192, num_hidden_layers=28,
                         num_attention_heads=24, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(family="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
                         tie_word_embeddings=False, rope_theta=5e5, rms_norm_eps=1e-5, max_position_embeddings=131072,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "tiny": dict(family="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=4096, tie_word_embeddings=True, max_position_embeddings=4096),
}


def sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str):
    """(result, seconds) of one call, the device synchronised on both sides."""
    sync(device)
    t = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t


def peak_reset(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def peak_gb(device: str) -> float:
    return torch.cuda.max_memory_allocated() / 1e9 if str(device).startswith("cuda") else float("nan")


CALLS = 20


def graph_time(fn) -> float:
    """Seconds per call of fn, replayed from a CUDA graph of CALLS calls."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(CALLS):
            fn()
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3 / (5 * CALLS)


def row(lines: list[str], head: str, fns, nbytes: int) -> None:
    """One table row: "us (TB/s of nbytes)" per function, timed by graph_time; a failing one says so."""
    cells = []
    for fn in fns:
        try:
            secs = graph_time(fn)
            cells.append(f"{secs * 1e6:.1f} ({nbytes / secs / 1e12:.2f})")
        except Exception as e:  # one failing variant must not lose the others
            cells.append(f"failed: {type(e).__name__}")
    lines.append(head + " | ".join(cells) + " |")
    print(lines[-1], flush=True)


def synthetic_tokenizer(vocab_size: int):
    """A word-level tokenizer over vocab_size ids: real prompt words, the marker's words, then fillers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<pad>", "<unk>"] + sorted(set(PROMPT_TEMPLATE.replace("{question}", "").split()) | {"\\boxed{"})
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # words joined by spaces, also after a reload
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def random_model(shape: str, dtype, device: str = "cpu") -> CausalLM:
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    spec = dict(SHAPES[shape])
    family = spec.pop("family")
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config}[family](eos_token_id=0, pad_token_id=1, **spec)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()
    return CausalLM(model, synthetic_tokenizer(cfg.vocab_size), name=shape)


def questions_for(lm: CausalLM, n: int, prompt_len: int | None) -> list[str]:
    if prompt_len is None:
        return [p.question for p in load_dataset("gsm8k", limit=n).problems]
    base = len(lm.tokenizer.encode(format_prompt("x"))) - 1
    if prompt_len <= base:
        raise SystemExit(f"--prompt-len must exceed the prompt template's {base} tokens")
    return [" ".join(f"w{i + q}" for i in range(prompt_len - base)) for q in range(n)]


def machine(device: str = "cpu") -> str:
    """The machine line every results table starts with."""
    import transformers

    where = torch.cuda.get_device_name() if str(device).startswith("cuda") else platform.processor() or platform.machine()
    return (f"machine: {where}, {torch.get_num_threads()} threads; torch {torch.__version__}, transformers "
            f"{transformers.__version__}; {datetime.date.today()}")


def add_no_write(ap) -> None:
    ap.add_argument("--no-write", action="store_true", help="print only; do not append to benchmarks/RESULTS.md")


def write_results(args, text: str, echo: bool = False) -> None:
    """Append a table to benchmarks/RESULTS.md unless --no-write (and print it with ``echo``)."""
    if echo:
        print(text, flush=True)
    if not args.no_write:
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write("\n" + text.rstrip("\n") + "\n")
