"""One row's step of a rollout, shared by both engines, the reference and the scorer (METHOD.md §2-§3).

A row moves through its own phases, CoT -> prefill -> answer -> done, and every
step feeds it one input embedding:

- CoT: ``E[x_t]`` (hard) or ``h~_t = p E + sigma eps_t`` (soft / fuzzy; or the
  noise on the hidden state or the logits, METHOD.md §10), with the greedy
  shadow (soft / fuzzy) or the sampled text (hard) checked for the marker;
- prefill: the forced tokens ``\\boxed{`` or ``The final answer is: \\boxed{``;
- answer: sampled or greedy hard tokens until EOS or ``max_answer_length``.

All randomness of a row is drawn up front from its own generator, seeded by
(seed, question, sample index), so a row's rollout does not depend on the
other rows of its batch. Here: the ``Rollout`` record, the draws and seeds,
the per-call setup, the stop rule, the CoT and answer step, and the records
the engines build.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import torch

from softtokens import cot, prompts
from softtokens.config import CoTConfig, RolloutConfig
from softtokens.models import CausalLM
from softtokens.errors import UsageError

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
    noise_on: str = "embedding"
    """Where the CoT noise went (METHOD.md §10)."""
    cot_noisy: torch.Tensor | None = None
    """noise_on hidden / logits / topk_logits: the noisy hidden state (T, d), logits (T, V) or top-k logits (T, k)
    as sampled, in float32: the variable whose Gaussian density is the step's log-likelihood."""
    cot_noisy_ids: torch.Tensor | None = None
    """noise_on topk_logits: the top-k token ids (T, k) the noise was added to."""

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

    eps: torch.Tensor | None  # (L, n) standard normal, soft / fuzzy with noise (n: RolloutSetup.noise_dim)
    u_cot: torch.Tensor | None  # (L,) uniforms, hard sampled CoT
    u_answer: torch.Tensor | None  # (A,) uniforms, sampled answer


def unique_prompts(prompt_ids: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in order of first appearance, and each row's index among them."""
    index: dict[tuple, int] = {}
    which = [index.setdefault(tuple(p), len(index)) for p in prompt_ids]
    return [list(p) for p in index], which


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

    @property
    def noise_dim(self) -> int:
        """Coordinates of one step's noise: d on the embedding or hidden state, V on the logits, k on the top k."""
        c = self.cot_cfg
        return {"logits": self.E.shape[0], "topk_logits": min(c.noise_top_k, self.E.shape[0])}.get(c.noise_on,
                                                                                           self.E.shape[1])


def rollout_setup(lm: CausalLM, cot_cfg: CoTConfig, cfg: RolloutConfig, sigma: float | None = None) -> RolloutSetup:
    """Resolve sigma, the prefill tokens and the marker test for one rollout call."""
    E = lm.embedding_matrix().detach()
    if cot_cfg.mode == "hard" or not cot_cfg.sampled:
        sigma = 0.0
    elif sigma is None:
        sigma = default_sigma(lm, cot_cfg)
    tok = lm.tokenizer
    prefills = {
        "marker": tok.encode(cfg.marker_prefill, add_special_tokens=False),
        "length": tok.encode(cfg.length_prefill, add_special_tokens=False),
    }
    prefills["eos"] = prefills["length"]
    marker = cfg.marker.rstrip()
    if marker not in tok.decode(tok.encode(" " + marker, add_special_tokens=False)):
        raise UsageError(f"{lm.name}: the tokenizer cannot spell the marker {marker!r}, so no CoT could stop on it")
    # Only a token whose text ends in the marker's last character can complete it: decode the tail then.
    marker_end_ids = lm.ids_ending_with(marker[-1])
    return RolloutSetup(lm, cot_cfg, cfg, sigma, E, prefills, marker_end_ids, marker_window(marker), set(lm.eos_ids))


@torch.no_grad()
def default_sigma(lm: CausalLM, cot_cfg: CoTConfig) -> float:
    """sigma = gamma x RMS of what the noise is added to (METHOD.md §2, §10), from the model as it is now.

    The embedding: RMS(E). The hidden state and the logits vary with the input, so their RMS is measured on a
    fixed text (the default prompt around a small sum), over all its positions; the logits are centred per
    position first (a constant shift changes no softmax). The top-k logits take the logits' scale.
    """
    E = lm.embedding_matrix().detach()
    if cot_cfg.noise_on == "embedding":
        return cot.noise_scale(E, cot_cfg.gamma)
    ids = torch.tensor([lm.tokenizer.encode(prompts.format_prompt("What is 12 + 30?"))], device=lm.device)
    g = lm.hidden(lm.embed(ids), torch.ones_like(ids), torch.arange(ids.shape[1], device=lm.device)[None])[0]
    if cot_cfg.noise_on == "hidden":
        return cot.noise_scale(g, cot_cfg.gamma)
    z = lm.logits(g)
    return cot.noise_scale(z - z.mean(-1, keepdim=True), cot_cfg.gamma)


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


def non_finite(step: int, rows: list[int]) -> FloatingPointError:
    """The error both engines raise when a decode step's logits overflow."""
    return FloatingPointError(f"non-finite logits at decode step {step} in rows {rows}: the model overflowed "
                              "(try dtype float32, or check the weights)")


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
    noisy: torch.Tensor | None = None  # (R, n) the noisy hidden state / logits / top-k logits (noise_on != embedding)
    noisy_ids: torch.Tensor | None = None  # (R, k) the top-k ids (noise_on topk_logits)


def cot_step(setup: RolloutSetup, z: torch.Tensor, eps: torch.Tensor | None, u: torch.Tensor | None,
             hidden: torch.Tensor | None = None) -> CoTStep:
    """The next CoT input from logits z (R, V): a sampled / argmax token, or p E + sigma eps (METHOD.md §2).

    ``hidden`` (R, d), the final hidden state the logits came from, is read by noise_on hidden only.
    """
    lm, c, cfg = setup.lm, setup.cot_cfg, setup.cfg
    top = None
    if cfg.record_top_k:
        top = tuple(cot.cot_probs(z, c.temperature or 1.0).topk(min(cfg.record_top_k, z.shape[-1])))
    if c.mode == "hard":
        x = cot.sample_categorical(cot.cot_probs(z, c.temperature), u) if c.temperature > 0 else cot.argmax(z)
        return CoTStep(lm.embed(x), x, cot.token_log_probs(z, x, c.temperature), cot.entropy(z), cot.top2_gap(z),
                       None, top)
    if c.noise_on != "embedding":
        return _noised_elsewhere(setup, z, eps, hidden, top)
    mu = cot.mixture(cot.cot_probs(z, c.temperature), setup.E)  # (R, d)
    h = cot.soft_input(mu, eps, setup.sigma).to(lm.dtype)
    lp = cot.gaussian_log_density(h, mu, setup.sigma) if setup.sigma > 0 else torch.zeros_like(mu[:, 0])
    return CoTStep(h, cot.argmax(z), lp, cot.entropy(z), cot.top2_gap(z), mu, top)


def _noised_elsewhere(setup: RolloutSetup, z, eps, hidden, top) -> CoTStep:
    """Noise on the hidden state, the logits or the top-k logits (METHOD.md §10): the step samples that variable
    (recorded, float32) around the model's own, and feeds the mixture it gives, softmax(z~ / tau) E. The
    log-density is the Gaussian of the noisy variable; the shadow token is the argmax of the noisy logits."""
    lm, c, sigma = setup.lm, setup.cot_cfg, setup.sigma
    ids = None
    if c.noise_on == "hidden":
        assert hidden is not None, "noise_on hidden needs the step's hidden state"
        own = hidden.to(cot.compute_dtype(hidden.dtype))
        noisy = cot.soft_input(own, eps, sigma).to(lm.dtype).to(own.dtype)  # the head reads model-dtype states
        z_noisy = lm.logits(noisy.to(lm.dtype))
    elif c.noise_on == "logits":
        own = z.to(cot.compute_dtype(z.dtype))
        noisy = z_noisy = cot.soft_input(own, eps, sigma)
    else:
        own, ids = z.to(cot.compute_dtype(z.dtype)).topk(setup.noise_dim, dim=-1)
        noisy = cot.soft_input(own, eps, sigma)
    lp = cot.gaussian_log_density(noisy, own, sigma) if sigma > 0 else torch.zeros_like(own[:, 0])
    if ids is None:
        inputs, shadow = cot.mixture(cot.cot_probs(z_noisy, c.temperature), setup.E), cot.argmax(z_noisy)
    else:
        inputs = cot.topk_mixture(noisy, ids, c.temperature, setup.E)
        shadow = ids.gather(1, noisy.argmax(-1, keepdim=True))[:, 0]
    return CoTStep(inputs.to(lm.dtype), shadow, lp, cot.entropy(z), cot.top2_gap(z), inputs, top, noisy, ids)


def answer_step(setup: RolloutSetup, z: torch.Tensor, u: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The next answer token (sampled at answer_temperature, or greedy) and its log-prob."""
    tau = setup.cfg.answer_temperature
    a = cot.sample_categorical(cot.cot_probs(z, tau), u) if tau > 0 else cot.argmax(z)
    return a, cot.token_log_probs(z, a, tau)


@dataclass
class Row:
    """Host-side state of one row: its phase and what it has produced so far."""

    phase: int = COT
    cot_ids: list[int] = field(default_factory=list)
    stop_reason: str = ""
    prefill: list[int] = field(default_factory=list)
    ptr: int = 0
    answer_ids: list[int] = field(default_factory=list)
    answer_lp: list[float] = field(default_factory=list)


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
        "noisy": stacked(lambda s: s.noisy),
        "noisy_ids": stacked(lambda s: s.noisy_ids),
    }


def records(setup: RolloutSetup, prompt_ids, keys, rows: list[Row], cot: dict) -> list[Rollout]:
    """Rollout records: each row's CoT steps cut out of the (T_max, R, ...) tensors in ``cot``."""
    lm, cot_cfg, cfg = setup.lm, setup.cot_cfg, setup.cfg
    tok = lm.tokenizer
    out = []
    for r, ((question, g), row) in enumerate(zip(keys, rows)):
        T = len(row.cot_ids)

        def cut(name):
            return None if cot.get(name) is None else cot[name][:T, r].clone()

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
                noise_on=cot_cfg.noise_on,
                cot_noisy=cut("noisy"),
                cot_noisy_ids=cut("noisy_ids"),
            )
        )
    return out
