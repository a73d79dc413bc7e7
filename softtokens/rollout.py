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
from dataclasses import dataclass, field

import torch

from softtokens import cot, prompts
from softtokens.config import CoTConfig, RolloutConfig
from softtokens.models import CausalLM

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
    marker_end_ids: set[int]
    marker_window: int
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
    marker_end_ids = {i for i, t in enumerate(lm.token_texts) if t.rstrip().endswith(marker[-1])}
    window = len(tok.encode(marker, add_special_tokens=False)) + 8
    return RolloutSetup(lm, cot_cfg, cfg, sigma, E, prefills, marker_end_ids, window, set(lm.eos_ids))


def encode_prompts(lm: CausalLM, questions: list[str], cfg: RolloutConfig) -> list[list[int]]:
    """Token ids of each question's prompt; an empty question or an over-long prompt is an error."""
    out = []
    budget = cfg.max_cot_length + cfg.max_answer_length + len(lm.tokenizer.encode(cfg.length_prefill, add_special_tokens=False))
    for i, q in enumerate(questions):
        try:
            text = prompts.format_prompt(q, cfg.prompt_template)
        except ValueError as e:
            raise ValueError(f"question {i}: {e}") from None
        if cfg.chat_template:
            ids = lm.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
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
        tail = setup.lm.tokenizer.decode(ids[-setup.marker_window :])
        if prompts.ends_with_marker(tail, setup.cfg.marker):
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
) -> list[Rollout]:
    """Rollouts for each question x num_generations, question-major ([q0 g0, q0 g1, ..., q1 g0, ...])."""
    if isinstance(questions, str):
        questions = [questions]
    if not questions:
        raise ValueError("no questions given")
    setup = prepare(lm, cot_cfg, cfg, sigma)
    prompt_ids = encode_prompts(lm, questions, cfg)
    rows = [(qi, g) for qi in range(len(questions)) for g in range(cfg.num_generations)]
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc=f"rollouts ({cot_cfg.mode})", unit="batch")
    out: list[Rollout] = []
    for batch in batches:
        draws = [
            row_draws(row_seed(cfg.seed, questions[qi], g), setup.E.shape[1], cot_cfg, cfg, lm.device, torch.float32)
            for qi, g in batch
        ]
        out += decode_batch(setup, [prompt_ids[qi] for qi, _ in batch], draws, [(questions[qi], g) for qi, g in batch])
    return out


def _stack_draw(draws: list[RowDraws], name: str) -> torch.Tensor | None:
    vals = [getattr(d, name) for d in draws]
    return None if vals[0] is None else torch.stack(vals)


@torch.no_grad()
def decode_batch(setup: RolloutSetup, prompt_ids: list[list[int]], draws: list[RowDraws], keys) -> list[Rollout]:
    """Decode one batch of rows in lockstep; rows change phase independently."""
    lm, cot_cfg, cfg, E, sigma = setup.lm, setup.cot_cfg, setup.cfg, setup.E, setup.sigma
    R, dev, dtype = len(prompt_ids), lm.device, lm.dtype
    eps, u_cot, u_ans = (_stack_draw(draws, n) for n in ("eps", "u_cot", "u_answer"))

    P = max(len(p) for p in prompt_ids)
    ids = torch.full((R, P), lm.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(R, P, dtype=torch.long)
    for r, p in enumerate(prompt_ids):  # left padding
        ids[r, P - len(p) :] = torch.tensor(p)
        mask[r, P - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)  # the default positions would count the padding
    cache = lm.new_cache()
    z = lm.logits(lm.hidden(lm.embed(ids), mask, pos, cache)[:, -1])  # (R, V)
    next_pos = pos[:, -1:] + 1

    phase = [COT] * R
    cot_ids: list[list[int]] = [[] for _ in range(R)]
    stop_reason = [""] * R
    prefill: list[list[int]] = [[] for _ in range(R)]
    ptr = [0] * R
    ans_ids: list[list[int]] = [[] for _ in range(R)]
    steps_in, steps_mu, steps_lp, steps_ent, steps_alp, steps_top = [], [], [], [], [], []
    ans_step = torch.zeros(R, dtype=torch.long, device=dev)
    max_steps = cfg.max_cot_length + max(len(v) for v in setup.prefills.values()) + cfg.max_answer_length
    rows = torch.arange(R, device=dev)

    for step in range(max_steps + 1):
        if all(ph == DONE for ph in phase):
            break
        assert step < max_steps, "rollout did not finish within its step bound"
        active = torch.tensor([ph != DONE for ph in phase], device=dev)
        if not torch.isfinite(z[active]).all():
            bad = [r for r in range(R) if phase[r] != DONE and not torch.isfinite(z[r]).all()]
            raise FloatingPointError(
                f"non-finite logits at decode step {step} in rows {bad}: the model overflowed "
                "(try dtype float32, or check the weights)"
            )
        in_cot = any(ph == COT for ph in phase)
        tok = torch.tensor([prefill[r][ptr[r]] if phase[r] == PREFILL else 0 for r in range(R)], device=dev)

        if in_cot:  # the CoT input of every row (only CoT rows keep it)
            steps_ent.append(cot.entropy(z))
            if cot_cfg.mode == "hard":
                if cot_cfg.temperature > 0:
                    x = cot.sample_categorical(cot.cot_probs(z, cot_cfg.temperature), u_cot[:, step])
                else:
                    x = z.argmax(-1)
                steps_lp.append(cot.token_log_probs(z, x, cot_cfg.temperature))
                cot_in, shadow = lm.embed(x), x
            else:
                mu = cot.mixture(cot.cot_probs(z, cot_cfg.temperature), E)  # (R, d)
                h = cot.soft_input(mu, None if eps is None else eps[:, step], sigma)
                cot_in, shadow = h.to(dtype), z.argmax(-1)
                lp = cot.gaussian_log_density(cot_in, mu, sigma) if sigma > 0 else torch.zeros(R, device=dev)
                steps_lp.append(lp)
                steps_in.append(cot_in)
                if cfg.record_means:
                    steps_mu.append(mu)
            shadow_list = shadow.tolist()
            if cfg.record_top_k:
                probs = cot.cot_probs(z, cot_cfg.temperature or 1.0).topk(min(cfg.record_top_k, z.shape[-1]))
                steps_top.append(probs)

        if any(ph == ANSWER for ph in phase):
            if cfg.answer_temperature > 0:
                u = u_ans[rows, ans_step.clamp(max=cfg.max_answer_length - 1)]
                a = cot.sample_categorical(cot.cot_probs(z, cfg.answer_temperature), u)
            else:
                a = z.argmax(-1)
            steps_alp.append(cot.token_log_probs(z, a, cfg.answer_temperature))
            is_ans = torch.tensor([ph == ANSWER for ph in phase], device=dev)
            tok = torch.where(is_ans, a, tok)
            ans_step += is_ans.long()
            a_list = a.tolist()
        else:
            steps_alp.append(None)

        inp = lm.embed(tok)  # (R, d): prefill / answer tokens
        if in_cot:
            is_cot = torch.tensor([ph == COT for ph in phase], device=dev)
            inp = torch.where(is_cot[:, None], cot_in, inp)

        for r in range(R):  # host-side bookkeeping: each row's phase moves on its own
            if phase[r] == COT:
                cot_ids[r].append(shadow_list[r])
                reason = cot_stop(setup, cot_ids[r], step)
                if reason:
                    stop_reason[r], prefill[r], phase[r] = reason, setup.prefills[reason], PREFILL
            elif phase[r] == PREFILL:
                ptr[r] += 1
                if ptr[r] == len(prefill[r]):
                    phase[r] = ANSWER
            elif phase[r] == ANSWER:
                ans_ids[r].append(a_list[r])
                if a_list[r] in setup.eos_ids or len(ans_ids[r]) == cfg.max_answer_length:
                    phase[r] = DONE
        if all(ph == DONE for ph in phase):
            break

        mask = torch.cat([mask, torch.ones(R, 1, dtype=mask.dtype, device=dev)], dim=1)
        z = lm.logits(lm.hidden(inp[:, None], mask, next_pos, cache)[:, -1])
        next_pos = next_pos + 1

    return _records(setup, prompt_ids, keys, cot_ids, stop_reason, prefill, ans_ids,
                    steps_in, steps_mu, steps_lp, steps_ent, steps_alp, steps_top)


def _records(setup, prompt_ids, keys, cot_ids, stop_reason, prefill, ans_ids,
             steps_in, steps_mu, steps_lp, steps_ent, steps_alp, steps_top) -> list[Rollout]:
    """Cut each row's steps out of the per-step batch tensors."""
    lm, cot_cfg, cfg = setup.lm, setup.cot_cfg, setup.cfg
    lp = torch.stack(steps_lp).cpu()  # (T_max, R)
    ent = torch.stack(steps_ent).cpu()
    soft = cot_cfg.mode != "hard"
    emb = torch.stack(steps_in).cpu() if soft else None  # (T_max, R, d)
    mus = torch.stack(steps_mu).cpu() if steps_mu else None
    top_ids = torch.stack([t.indices for t in steps_top]).cpu() if steps_top else None  # (T_max, R, k)
    top_p = torch.stack([t.values for t in steps_top]).cpu() if steps_top else None
    out = []
    for r, (question, g) in enumerate(keys):
        T, n_ans = len(cot_ids[r]), len(ans_ids[r])
        first = T + len(prefill[r])  # the global step of the row's first answer token
        alp = torch.stack([steps_alp[first + k][r] for k in range(n_ans)]).cpu()
        answer_text = lm.tokenizer.decode([i for i in ans_ids[r] if i not in setup.eos_ids], skip_special_tokens=True)
        out.append(
            Rollout(
                question=question,
                sample_index=g,
                mode=cot_cfg.mode,
                cot_temperature=cot_cfg.temperature,
                answer_temperature=cfg.answer_temperature,
                sigma=setup.sigma,
                prompt_ids=list(prompt_ids[r]),
                cot_ids=cot_ids[r],
                cot_embeds=emb[:T, r].clone() if soft else None,
                cot_text=lm.tokenizer.decode(cot_ids[r]),
                stop_reason=stop_reason[r],
                prefill_ids=list(prefill[r]),
                answer_ids=ans_ids[r],
                answer_text=answer_text,
                cot_logprobs=lp[:T, r].clone(),
                answer_logprobs=alp,
                cot_entropy=ent[:T, r].clone(),
                cot_means=mus[:T, r].clone() if mus is not None else None,
                prefill_text=lm.tokenizer.decode(prefill[r]),
                cot_top_ids=top_ids[:T, r].clone() if top_ids is not None else None,
                cot_top_probs=top_p[:T, r].clone() if top_p is not None else None,
            )
        )
    return out

