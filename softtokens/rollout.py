"""Batched rollouts with hard, soft or fuzzy chains of thought (METHOD.md §2-§3).

Many prompts x ``num_generations`` rows are left-padded and decoded in lockstep
with a KV cache. Each row moves through its own phases, CoT -> prefill ->
answer -> done, and every step feeds each row one input embedding:

- CoT: ``E[x_t]`` (hard) or ``h~_t = p E + sigma eps_t`` (soft / fuzzy), with the
  greedy shadow (soft / fuzzy) or the sampled text (hard) checked for the marker;
- prefill: the forced tokens ``\\boxed{`` or ``The final answer is: \\boxed{``;
- answer: sampled or greedy hard tokens until EOS or ``max_answer_length``.

All randomness of a row is drawn up front from its own generator, seeded by
(seed, question, sample index), so a row's rollout does not depend on the
other rows of its batch. ``reference.py`` holds the slow per-row path this
engine must match.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softtokens import cot, prompts
from softtokens.config import CoTConfig, RolloutConfig
from softtokens.models import CausalLM
from softtokens.data import is_chat

COT, PREFILL, ANSWER, DONE = 0, 1, 2, 3


@dataclass
class Rollout:
    """One rollout: what training needs to score it again, and what a reader wants to see."""

    question: str
    sample_index: int
    mode: str
    cot_temperature: float
    answer_temperature: float
    sigma: float
    """Noise scale used for the CoT inputs; 0 when the CoT had no noise (hard, or greedy soft/fuzzy)."""
    prompt_ids: list[int]
    cot_ids: list[int]
    """Hard: the tokens fed. Soft / fuzzy: the greedy shadow (argmax of p at each step)."""
    cot_embeds: torch.Tensor | None
    """Soft / fuzzy: the inputs h~ exactly as fed (T, d), in the model dtype; None for hard."""
    cot_text: str
    stop_reason: str
    """'marker', 'length' or 'eos' (METHOD.md §3)."""
    prefill_ids: list[int]
    answer_ids: list[int]
    """Answer tokens as sampled, including a final EOS."""
    answer_text: str
    cot_logprobs: torch.Tensor
    """Per CoT step at rollout time: Gaussian log-density (soft/fuzzy, 0 without noise) or token log-prob (hard)."""
    answer_logprobs: torch.Tensor
    cot_entropy: torch.Tensor
    """Entropy of the model's next-token distribution (tau = 1) at each CoT step."""
    cot_logit_gap: torch.Tensor | None = None
    """Top-1 minus top-2 logit at each CoT step (near-ties are where rollout and scorer can disagree)."""
    cot_means: torch.Tensor | None = None
    """mu_t per soft/fuzzy step (T, d), kept only with ``record_means``."""
    cot_top_ids: torch.Tensor | None = None
    """(T, k) most likely tokens of p at each CoT step (p at tau = 1 for greedy hard), with ``record_top_k``."""
    cot_top_probs: torch.Tensor | None = None
    prefill_text: str = ""

    @property
    def cot_length(self) -> int:
        return len(self.cot_ids)

    @property
    def loglik(self) -> torch.Tensor:
        """l as the rollout recorded it: CoT plus answer log-likelihood, summed in float64 (prefill excluded)."""
        return self.cot_logprobs.double().sum() + self.answer_logprobs.double().sum()

    @property
    def completion(self) -> str:
        """The graded answer text: ``\\boxed{`` followed by the answer (METHOD.md §3)."""
        return prompts.ANSWER_PREFIX + self.answer_text


@dataclass
class RowDraws:
    """Everything random about one row, drawn before decoding starts."""

    eps: torch.Tensor | None  # (L, d) standard normal, soft / fuzzy with noise
    u_cot: torch.Tensor | None  # (L,) uniforms, hard sampled CoT
    u_answer: torch.Tensor | None  # (A,) uniforms, sampled answer


def row_seed(seed: int, question: str, sample_index: int) -> int:
    """A stable 63-bit seed for one row: the same (seed, question, g) always gives the same rollout."""
    digest = hashlib.sha256(f"{seed}\0{sample_index}\0{question}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def row_draws(seed: int, dim: int, cot_cfg: CoTConfig, cfg: RolloutConfig, device, dtype) -> RowDraws:
    """Draw a row's noise and uniforms in a fixed order from its own generator."""
    gen = torch.Generator(device=device).manual_seed(seed)
    L, A = cfg.max_cot_length, cfg.max_answer_length
    eps = u_cot = u_answer = None
    if cot_cfg.mode != "hard" and cot_cfg.sampled:
        eps = torch.randn(L, dim, generator=gen, device=device, dtype=dtype)
    if cot_cfg.mode == "hard" and cot_cfg.sampled:
        u_cot = torch.rand(L, generator=gen, device=device, dtype=dtype)
    if cfg.answer_temperature > 0:
        u_answer = torch.rand(A, generator=gen, device=device, dtype=dtype)
    return RowDraws(eps, u_cot, u_answer)


@dataclass
class RolloutSetup:
    """What every batch of a rollout call shares: resolved once per call."""

    lm: CausalLM
    cot_cfg: CoTConfig
    cfg: RolloutConfig
    sigma: float
    E: torch.Tensor
    prefills: dict[str, list[int]]
    marker_end_ids: frozenset[int]
    marker_window: int
    """Characters of the CoT's tail that the marker test reads (both engines read the same tail)."""
    eos_ids: set[int] = field(default_factory=set)


def prepare(lm: CausalLM, cot_cfg: CoTConfig, cfg: RolloutConfig, sigma: float | None = None) -> RolloutSetup:
    """Resolve sigma, the prefill tokens and the marker test for one rollout call."""
    E = lm.embedding_matrix().detach()
    if sigma is None:
        sigma = cot.noise_scale(E, cot_cfg.gamma)
    if cot_cfg.mode == "hard" or not cot_cfg.sampled:
        sigma = 0.0
    tok = lm.tokenizer
    prefills = {
        "marker": tok.encode(cfg.marker_prefill, add_special_tokens=False),
        "length": tok.encode(cfg.length_prefill, add_special_tokens=False),
    }
    prefills["eos"] = prefills["length"]
    marker = cfg.marker.rstrip()
    if marker not in tok.decode(tok.encode(" " + marker, add_special_tokens=False)):
        raise ValueError(f"{lm.name}: the tokenizer cannot spell the marker {marker!r}, so no CoT could stop on it")
    # Only a token whose text ends in the marker's last character can complete it: decode the tail then.
    marker_end_ids = lm.ids_ending_with(marker[-1])
    return RolloutSetup(lm, cot_cfg, cfg, sigma, E, prefills, marker_end_ids, marker_window(marker), set(lm.eos_ids))


def marker_window(marker: str) -> int:
    """How many of the CoT's last characters the marker test reads: the marker and room for trailing whitespace."""
    return 2 * len(marker.rstrip()) + 32


def text_tail(token_texts: list[str], ids: list[int], width: int) -> str:
    """The last ``width`` characters of the CoT's text, read as its tokens' texts joined.

    Characters, not tokens: a marker spelled in many tokens (one per character, say) is still seen. The static
    engine keeps the same characters on the device (``engine.MarkerMatcher``), so both engines stop on the same
    token sequence.
    """
    parts, n = [], 0
    for i in reversed(ids):
        parts.append(token_texts[i])
        n += len(parts[-1])
        if n >= width:
            break
    return "".join(reversed(parts))[-width:]


def encode_prompts(lm: CausalLM, questions: list, cfg: RolloutConfig) -> list[list[int]]:
    """Token ids of each question's prompt; an empty question or an over-long prompt is an error.

    A text question goes into ``prompt_template`` (then, with ``chat_template``, into one user message);
    a chat-format question (role / content messages) is rendered by the tokenizer's chat template as it is.
    """
    out = []
    budget = cfg.max_cot_length + cfg.max_answer_length + len(lm.tokenizer.encode(cfg.length_prefill, add_special_tokens=False))
    for i, q in enumerate(questions):
        if is_chat(q):  # the messages are the whole prompt: no template around them
            messages = q
        else:
            try:
                text = prompts.format_prompt(q, cfg.prompt_template)
            except ValueError as e:
                raise ValueError(f"question {i}: {e}") from None
            messages = [{"role": "user", "content": text}] if cfg.chat_template else None
        if messages is not None:
            if not getattr(lm.tokenizer, "chat_template", None):
                raise ValueError(f"question {i}: a chat prompt needs a tokenizer with a chat template, and "
                                 f"{lm.name}'s has none; use plain-text questions and prompt_template")
            ids = lm.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                   return_dict=False)
        else:
            ids = lm.tokenizer.encode(text)
        if lm.max_length is not None and len(ids) + budget > lm.max_length:
            raise ValueError(
                f"question {i}: prompt of {len(ids)} tokens + up to {budget} generated tokens exceeds the "
                f"model's context of {lm.max_length}; shorten the question or lower max_cot_length"
            )
        out.append(list(ids))
    return out


def cot_stop(setup: RolloutSetup, ids: list[int], step: int) -> str | None:
    """Why the CoT ends after its latest token, or None to go on (METHOD.md §3)."""
    last = ids[-1]
    if last in setup.marker_end_ids:
        if prompts.ends_with_marker(text_tail(setup.lm.token_texts, ids, setup.marker_window), setup.cfg.marker):
            return "marker"
    if setup.cfg.stop_at_eos and last in setup.eos_ids:
        return "eos"
    if step + 1 >= setup.cfg.max_cot_length:
        return "length"
    return None


def generate_rollouts(
    lm: CausalLM,
    questions: list[str],
    cot_cfg: CoTConfig,
    cfg: RolloutConfig,
    sigma: float | None = None,
    progress: bool = False,
    rows: list[tuple[int, int]] | None = None,
    on_batch: Callable[[list[Rollout]], None] | None = None,
) -> list[Rollout]:
    """Rollouts for each question x num_generations, question-major ([q0 g0, q0 g1, ..., q1 g0, ...]).

    ``rows`` picks (question index, sample index) pairs instead (a rank's share of a batch): each row's
    rollout is the same as in the full call, since its randomness is its own. ``on_batch`` sees each
    decoded batch at once (to start grading it while the next one decodes).
    """
    if isinstance(questions, str):
        questions = [questions]
    if not questions:
        raise ValueError("no questions given")
    setup = prepare(lm, cot_cfg, cfg, sigma)
    prompt_ids = encode_prompts(lm, questions, cfg)
    if rows is None:
        rows = [(qi, g) for qi in range(len(questions)) for g in range(cfg.num_generations)]
    if not rows:
        return []
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"rollouts ({cot_cfg.mode})", unit="batch")
    decode = _engine(setup, prompt_ids, min(cfg.batch_size, len(rows)))
    out: list[Rollout] = []
    for batch in batches:
        draws = [
            row_draws(row_seed(cfg.seed, questions[qi], g), setup.E.shape[1], cot_cfg, cfg, lm.device, torch.float32)
            for qi, g in batch
        ]
        done = decode([prompt_ids[qi] for qi, _ in batch], draws, [(questions[qi], g) for qi, g in batch])
        if on_batch is not None:
            on_batch(done)
        out += done
    return out


def _engine(setup: RolloutSetup, prompt_ids: list[list[int]], rows: int):
    """The decode function for this call: the static engine where asked for (or on CUDA), else the HF loop."""
    from softtokens import decoder

    cfg, model = setup.cfg, setup.lm.model
    static = cfg.engine == "static" or (
        cfg.engine == "auto" and setup.lm.device.type == "cuda" and decoder.supports(model)
    )
    if not static:
        return lambda p, d, k: decode_batch(setup, p, d, k)
    if not decoder.supports(model):
        raise ValueError(f"engine 'static' supports {decoder.SUPPORTED} models; use engine 'hf' for {type(model).__name__}")
    from softtokens.engine import static_engine

    return static_engine(setup, max(len(p) for p in prompt_ids), rows, cfg.cuda_graphs).decode


@dataclass
class CoTStep:
    """One CoT step for a batch of rows: what is fed, and what is recorded."""

    inputs: torch.Tensor  # (R, d) in the model dtype
    ids: torch.Tensor  # (R,) the token fed (hard) or the greedy shadow (soft / fuzzy)
    logprob: torch.Tensor  # (R,) Gaussian log-density or token log-prob; 0 for noise-free soft
    entropy: torch.Tensor  # (R,) of softmax(z), tau = 1
    gap: torch.Tensor  # (R,) top-1 minus top-2 logit
    mu: torch.Tensor | None  # (R, d) soft / fuzzy mean
    top: tuple | None  # (probs, ids) each (R, k), with record_top_k


def cot_step(setup: RolloutSetup, z: torch.Tensor, eps: torch.Tensor | None, u: torch.Tensor | None) -> CoTStep:
    """The next CoT input from logits z (R, V): a sampled / argmax token, or p E + sigma eps (METHOD.md §2)."""
    lm, c, cfg = setup.lm, setup.cot_cfg, setup.cfg
    top = None
    if cfg.record_top_k:
        top = tuple(cot.cot_probs(z, c.temperature or 1.0).topk(min(cfg.record_top_k, z.shape[-1])))
    if c.mode == "hard":
        x = cot.sample_categorical(cot.cot_probs(z, c.temperature), u) if c.temperature > 0 else cot.argmax(z)
        return CoTStep(lm.embed(x), x, cot.token_log_probs(z, x, c.temperature), cot.entropy(z), cot.top2_gap(z),
                       None, top)
    mu = cot.mixture(cot.cot_probs(z, c.temperature), setup.E)  # (R, d)
    h = cot.soft_input(mu, eps, setup.sigma).to(lm.dtype)
    lp = cot.gaussian_log_density(h, mu, setup.sigma) if setup.sigma > 0 else torch.zeros_like(mu[:, 0])
    return CoTStep(h, cot.argmax(z), lp, cot.entropy(z), cot.top2_gap(z), mu, top)


def answer_step(setup: RolloutSetup, z: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next answer token (sampled at answer_temperature, or greedy) and its log-prob."""
    tau = setup.cfg.answer_temperature
    a = cot.sample_categorical(cot.cot_probs(z, tau), u) if tau > 0 else cot.argmax(z)
    return a, cot.token_log_probs(z, a, tau)


@dataclass
class _Row:
    """Host-side state of one row: its phase and what it has produced so far."""

    phase: int = COT
    cot_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""
    prefill: list[int] = field(default_factory=list)
    ptr: int = 0
    answer_ids: list[int] = field(default_factory=list)
    answer_lp: list[float] = field(default_factory=list)


@torch.no_grad()
def decode_batch(setup: RolloutSetup, prompt_ids: list[list[int]], draws: list[RowDraws], keys) -> list[Rollout]:
    """Decode one batch of rows in lockstep; rows change phase independently.

    Finished rows leave the batch (their cache rows are dropped) once a quarter of it is done,
    so a batch whose rows stop early does not pay for them until the slowest one ends.
    """
    lm, cfg = setup.lm, setup.cfg
    R, dev = len(prompt_ids), lm.device
    eps, u_cot, u_ans = (None if getattr(draws[0], n) is None else torch.stack([getattr(d, n) for d in draws])
                         for n in ("eps", "u_cot", "u_answer"))

    P = max(len(p) for p in prompt_ids)
    ids = torch.full((R, P), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(R, P, dtype=torch.long)
    for r, p in enumerate(prompt_ids):  # left padding
        ids[r, P - len(p) :] = torch.tensor(p)
        mask[r, P - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # the default positions would count the padding
    cache = lm.new_cache()
    z = lm.logits(lm.hidden(lm.embed(ids), mask, pos, cache)[:, -1])  # (R, V), one row per live row
    next_pos = pos[:, -1:] + 1

    rows = [_Row() for _ in range(R)]
    live = list(range(R))  # the original index of each row still in the batch
    steps: list[CoTStep] = []  # CoT step t of every row is global step t: the CoT comes first
    ans_step = torch.zeros(R, dtype=torch.long, device=dev)
    max_steps = cfg.max_cot_length + max(len(v) for v in setup.prefills.values()) + cfg.max_answer_length
    for step in range(max_steps + 1):
        assert step < max_steps, "rollout did not finish within its step bound"
        n, live_rows = len(live), [rows[r] for r in live]
        live_t = torch.tensor(live, device=dev)
        if not torch.isfinite(z).all():
            bad = [r for k, r in enumerate(live) if not torch.isfinite(z[k]).all()]
            raise FloatingPointError(
                f"non-finite logits at decode step {step} in rows {bad}: the model overflowed "
                "(try dtype float32, or check the weights)"
            )
        phases = torch.tensor([row.phase for row in live_rows], device=dev)
        tok = torch.tensor([row.prefill[row.ptr] if row.phase == PREFILL else 0 for row in live_rows], device=dev)
        if (phases == ANSWER).any():
            u = None if u_ans is None else u_ans[live_t, ans_step[live_t].clamp(max=cfg.max_answer_length - 1)]
            a, a_lp = answer_step(setup, z, u)
            tok = torch.where(phases == ANSWER, a, tok)
            ans_step[live_t] += (phases == ANSWER).long()
            a_list, a_lp = a.tolist(), a_lp.tolist()
        inp = lm.embed(tok)  # (n, d): prefill and answer tokens
        if (phases == COT).any():
            pick = (lambda x: None if x is None else x[live_t, step])
            st = cot_step(setup, z, pick(eps), pick(u_cot))
            steps.append(st if n == R else _widen(st, live_t, R))
            inp = torch.where((phases == COT)[:, None], st.inputs, inp)
            shadow = st.ids.tolist()

        for k, row in enumerate(live_rows):  # host-side bookkeeping: each row's phase moves on its own
            if row.phase == COT:
                row.cot_ids.append(shadow[k])
                reason = cot_stop(setup, row.cot_ids, step)
                if reason:
                    row.stop_reason, row.prefill, row.phase = reason, setup.prefills[reason], PREFILL
            elif row.phase == PREFILL:
                row.ptr += 1
                if row.ptr == len(row.prefill):
                    row.phase = ANSWER
            elif row.phase == ANSWER:
                row.answer_ids.append(a_list[k])
                row.answer_lp.append(a_lp[k])
                if a_list[k] in setup.eos_ids or len(row.answer_ids) == cfg.max_answer_length:
                    row.phase = DONE
        keep = [k for k, row in enumerate(live_rows) if row.phase != DONE]
        if not keep:
            break
        if n - len(keep) >= max(1, n // 4):  # drop finished rows from the batch and the cache
            keep_t = torch.tensor(keep, device=dev)
            cache.batch_select_indices(keep_t)
            inp, mask, next_pos, live = inp[keep_t], mask[keep_t], next_pos[keep_t], [live[k] for k in keep]

        mask = torch.cat([mask, torch.ones(len(live), 1, dtype=mask.dtype, device=dev)], dim=1)
        z = lm.logits(lm.hidden(inp[:, None], mask, next_pos, cache)[:, -1])
        next_pos = next_pos + 1
    return records(setup, prompt_ids, keys, rows, stack_steps(steps, setup.cfg.record_means))


def _widen(st: CoTStep, live: torch.Tensor, R: int) -> CoTStep:
    """A step of the live rows as a step of all R rows (rows that left the batch get zeros they never read)."""

    def wide(x):
        if x is None:
            return None
        full = x.new_zeros((R, *x.shape[1:]))
        full[live] = x
        return full

    top = None if st.top is None else (wide(st.top[0]), wide(st.top[1]))
    return CoTStep(wide(st.inputs), wide(st.ids), wide(st.logprob), wide(st.entropy), wide(st.gap), wide(st.mu), top)


def stack_steps(steps: list[CoTStep], keep_means: bool) -> dict[str, torch.Tensor | None]:
    """Per-step batch tensors as (T_max, R, ...) on CPU; None for what the steps did not keep."""

    def stacked(get):
        return None if get(steps[0]) is None else torch.stack([get(s) for s in steps]).cpu()

    return {
        "inputs": stacked(lambda s: s.inputs) if steps[0].mu is not None else None,
        "logprob": stacked(lambda s: s.logprob),
        "entropy": stacked(lambda s: s.entropy),
        "gap": stacked(lambda s: s.gap),
        "mu": stacked(lambda s: s.mu) if keep_means else None,
        "top_p": stacked(lambda s: s.top and s.top[0]),
        "top_ids": stacked(lambda s: s.top and s.top[1]),
    }


def records(setup: RolloutSetup, prompt_ids, keys, rows: list[_Row], cot: dict) -> list[Rollout]:
    """Rollout records: each row's CoT steps cut out of the (T_max, R, ...) tensors in ``cot``."""
    lm, cot_cfg, cfg = setup.lm, setup.cot_cfg, setup.cfg
    tok = lm.tokenizer
    out = []
    for r, ((question, g), row) in enumerate(zip(keys, rows)):
        T = len(row.cot_ids)

        def cut(name):
            return None if cot[name] is None else cot[name][:T, r].clone()

        out.append(
            Rollout(
                question=question,
                sample_index=g,
                mode=cot_cfg.mode,
                cot_temperature=cot_cfg.temperature,
                answer_temperature=cfg.answer_temperature,
                sigma=setup.sigma,
                prompt_ids=list(prompt_ids[r]),
                cot_ids=row.cot_ids,
                cot_embeds=cut("inputs"),
                cot_text=tok.decode(row.cot_ids),
                stop_reason=row.stop_reason,
                prefill_ids=list(row.prefill),
                answer_ids=row.answer_ids,
                answer_text=tok.decode([i for i in row.answer_ids if i not in setup.eos_ids], skip_special_tokens=True),
                cot_logprobs=cut("logprob"),
                answer_logprobs=torch.as_tensor(row.answer_lp, dtype=cot["logprob"].dtype),
                cot_entropy=cut("entropy"),
                cot_logit_gap=cut("gap"),
                cot_means=cut("mu"),
                prefill_text=tok.decode(row.prefill),
                cot_top_ids=cut("top_ids"),
                cot_top_probs=cut("top_p"),
            )
        )
    return out
