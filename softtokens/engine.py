"""The fast rollout engine: a static KV cache, every row's phase held in tensors, a CUDA-graph decode step.

Same interface and same records as ``hf_engine.decode_batch`` (the HF-forward
engine), which stays the reference it must match. What changes is how it runs:

- ``decoder.StaticDecoder`` writes each row's keys at that row's own position
  in a preallocated cache (prompts right-padded, no gaps), so a step has fixed
  shapes;
- one decode step does everything on the device: the CoT input (``cot_step``),
  the answer token (``answer_step``), the forced prefill token, the stop
  marker (matched on a rolling buffer of each row's last characters), the
  phase changes, the records and the forward pass;
- on CUDA that step is captured once per batch bucket (and per attention-span
  bucket where SDPA, not ``attention.decode_attention``, attends) and
  replayed; the host only asks "are all rows done?" every
  ``SYNC_EVERY`` steps. On CPU the same step runs eagerly, which is what the
  tests check against the reference.
"""

from __future__ import annotations

import dataclasses

import torch

from softtokens import cot
from softtokens.decoder import StaticDecoder, first_call
from softtokens.step import (ANSWER, COT, DONE, PREFILL, Row, RolloutSetup, RowDraws, answer_step, cot_step,
                             marker_window, non_finite, records, unique_prompts)

SYNC_EVERY = 16
SPAN_BUCKET = 128
WHITESPACE = " \t\n\r\f\v"
STOP_CODES = ("marker", "length", "eos")


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


def batch_bucket(rows: int) -> int:
    """Graphs are captured per batch size: round up to a power of two (>= 8) so they are reused."""
    return max(8, 1 << (rows - 1).bit_length())


@dataclasses.dataclass
class EngineState:
    """The engine's tensors at fixed addresses (R rows, CoT columns 0..L, answer columns 0..A-1): a captured
    graph reads and updates them in place, call after call. Optional fields are None where the setting does not
    need them (no noise for hard, no CoT inputs for hard, ...)."""

    # per row: phase, next cache position, stop code, CoT length, forced-prefill pointer, answer length,
    # first step with non-finite logits (-1: none)
    phase: torch.Tensor
    pos: torch.Tensor
    stop: torch.Tensor
    cot_len: torch.Tensor
    pre_ptr: torch.Tensor
    ans_len: torch.Tensor
    bad_step: torch.Tensor
    t: torch.Tensor  # (1,) the step count
    chars: torch.Tensor  # (R, width) each row's last characters, for the stop marker
    z: torch.Tensor  # (R, V) float32 logits of the step's last position
    cot_ids: torch.Tensor  # (R, L+1) records, one column per CoT step; column L is a spare
    logprob: torch.Tensor
    entropy: torch.Tensor
    gap: torch.Tensor
    ans_ids: torch.Tensor  # (R, A)
    ans_lp: torch.Tensor
    inputs: torch.Tensor | None = None  # (R, L+1, d) soft / fuzzy CoT inputs
    mu: torch.Tensor | None = None  # (R, L+1, d) their means, with record_means
    top_p: torch.Tensor | None = None  # (R, L+1, k) with record_top_k
    top_ids: torch.Tensor | None = None
    eps: torch.Tensor | None = None  # (R, L, d) the rows' pre-drawn noise (sampled soft / fuzzy)
    u_cot: torch.Tensor | None = None  # (R, L) uniforms of a sampled hard CoT
    u_answer: torch.Tensor | None = None  # (R, A) uniforms of a sampled answer

    # What a step writes (restored after a graph's warm-up and capture); the rest is read-only or write-once
    # per column. What a batch's records are read from.
    MUTABLE = ("phase", "t", "pos", "chars", "stop", "cot_len", "pre_ptr", "ans_len", "bad_step", "ans_ids",
               "ans_lp", "z")
    RECORDED = ("stop", "cot_len", "ans_len", "cot_ids", "ans_ids", "ans_lp", "inputs", "logprob", "entropy",
                "gap", "mu", "top_p", "top_ids")

    def tensors(self, names) -> dict[str, torch.Tensor]:
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}

    @classmethod
    def allocate(cls, setup: RolloutSetup, R: int, matcher: MarkerMatcher) -> EngineState:
        """Zeroed state for R rows of this setup's CoT: only the buffers its mode and records need."""
        lm, cfg = setup.lm, setup.cfg
        dev, L, A, d, V = lm.device, cfg.max_cot_length, cfg.max_answer_length, *setup.E.shape[::-1]
        fdt = cot.compute_dtype(lm.dtype)

        def zeros(*shape, dtype=torch.long):
            return torch.zeros(*shape, dtype=dtype, device=dev)

        c = setup.cot_cfg
        soft, k = c.mode != "hard", min(cfg.record_top_k, V)
        return cls(
            **{name: zeros(R) for name in ("phase", "pos", "stop", "cot_len", "pre_ptr", "ans_len", "bad_step")},
            # Float32 logits, the head's float32 result (``CausalLM.logits``): the scorer computes the same.
            t=zeros(1), chars=matcher.empty(R), z=zeros(R, V, dtype=fdt),
            cot_ids=zeros(R, L + 1), logprob=zeros(R, L + 1, dtype=fdt), entropy=zeros(R, L + 1, dtype=fdt),
            gap=zeros(R, L + 1, dtype=fdt), ans_ids=zeros(R, A), ans_lp=zeros(R, A, dtype=fdt),
            inputs=zeros(R, L + 1, d, dtype=lm.dtype) if soft else None,
            mu=zeros(R, L + 1, d, dtype=fdt) if soft and cfg.record_means else None,
            top_p=zeros(R, L + 1, k, dtype=fdt) if k else None,
            top_ids=zeros(R, L + 1, k) if k else None,
            eps=zeros(R, L, d, dtype=torch.float32) if soft and c.sampled else None,
            u_cot=zeros(R, L, dtype=torch.float32) if not soft and c.sampled else None,
            u_answer=zeros(R, A, dtype=torch.float32) if cfg.answer_temperature > 0 else None,
        )

    def to_host(self, n: int) -> dict[str, torch.Tensor]:
        """The recorded state of the first n rows on the host; on CUDA through pinned memory, in one wait
        (a CoT's inputs are R x L x d: a copy to pageable memory is a measurable share of a rollout)."""
        recorded = self.tensors(self.RECORDED)
        if self.z.device.type != "cuda":
            return {k: v[:n].cpu() for k, v in recorded.items()}
        host = {k: torch.empty(v[:n].shape, dtype=v.dtype, pin_memory=True) for k, v in recorded.items()}
        for k, v in recorded.items():
            host[k].copy_(v[:n], non_blocking=True)
        torch.cuda.current_stream().synchronize()
        return host


class MarkerMatcher:
    """Whether each row's CoT text ends with the marker, on the device, with no host round trip.

    Each row keeps its last ``width`` characters as code points; a token appends
    its own text (``CausalLM.token_texts``). The test is ``rollout.cot_stop``'s, on the same characters:
    only a token whose text ends in the marker's last character can complete it,
    and trailing whitespace is ignored.
    """

    def __init__(self, token_texts: list[str], marker: str, end_ids: frozenset[int], device):
        self.marker = torch.tensor([ord(c) for c in marker.rstrip()], device=device)
        self.width = w = marker_window(marker)
        table = torch.full((len(token_texts), w), -1, dtype=torch.long)
        lengths = torch.zeros(len(token_texts), dtype=torch.long)
        for i, text in enumerate(token_texts):
            tail = text[-w:]
            if tail:
                table[i, w - len(tail):] = torch.tensor([ord(c) for c in tail])
            lengths[i] = len(tail)
        self.table, self.lengths = table.to(device), lengths.to(device)
        self.candidate = torch.zeros(len(token_texts), dtype=torch.bool)
        self.candidate[sorted(end_ids)] = True  # the tokens rollout.cot_stop would decode a tail for
        self.candidate = self.candidate.to(device)
        self.whitespace = torch.tensor([ord(c) for c in WHITESPACE], device=device)

    def empty(self, rows: int) -> torch.Tensor:
        return torch.full((rows, self.width), -1, dtype=torch.long, device=self.table.device)

    def append(self, buf: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        """The last ``width`` characters of each row's text followed by its token's text."""
        idx = torch.arange(self.width, device=buf.device)[None] + self.lengths[tok][:, None]
        shifted = buf.gather(1, idx.clamp(max=self.width - 1))
        return torch.where(idx < self.width, shifted, self.table[tok])

    def ends_with_marker(self, buf: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        n = len(self.marker)
        trailing = torch.isin(buf, self.whitespace).flip(1).cumprod(1).sum(1)  # (R,)
        start = self.width - trailing - n
        idx = (start[:, None] + torch.arange(n, device=buf.device)[None]).clamp(min=0)
        match = (buf.gather(1, idx) == self.marker[None]).all(1) & (start >= 0)
        return match & self.candidate[tok]


class StepGraphs:
    """The decode step as CUDA graphs, one per attention span, captured on first use and replayed after."""

    def __init__(self):
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()  # one memory pool for every span's graph

    def __len__(self) -> int:
        return len(self.graphs)

    def replay(self, step, s: EngineState, span: int) -> None:
        """Run ``step()`` (the step on state ``s`` at this span) by its graph, capturing the graph first."""
        if span not in self.graphs:
            saved = {k: v.clone() for k, v in s.tensors(EngineState.MUTABLE).items()}
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up outside the graph (cuBLAS workspaces, lazy inits)
                for _ in range(2):
                    step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                step()
            for k, v in saved.items():  # capture and warm-up advanced the state: put it back
                getattr(s, k).copy_(v)
            self.graphs[span] = graph
        self.graphs[span].replay()


class StaticEngine:
    """Decodes batches of up to ``rows`` rows on a static cache; ``static_engine`` keeps one per model."""

    def __init__(self, setup: RolloutSetup, max_len: int, rows: int, cuda_graphs: bool = True,
                 compile: bool | None = None):
        lm, cfg = setup.lm, setup.cfg
        self.setup = setup
        self.prefill_len = max(len(v) for v in setup.prefills.values())
        self.max_len = max_len
        self.rows = rows
        self.use_graphs = cuda_graphs and lm.device.type == "cuda"
        compile = cfg.compile_decoder and self.use_graphs if compile is None else compile
        self.dec = StaticDecoder(lm.model, self.rows, self.max_len, compile=compile,
                                 attention_kernel=cfg.attention_kernel)
        # The token / phase logic of a step, compiled too: ~100 small kernels fused into a few. The function,
        # not the bound method, with the engine passed in: a compiled bound method holds its engine, a reference
        # cycle that kept a dropped engine's cache allocated until the garbage collector ran.
        self._logic = torch.compile(StaticEngine._logic_eager, dynamic=False, fullgraph=True) if compile else None
        self._logic_checked = False
        self.matcher = MarkerMatcher(lm.token_texts, cfg.marker, setup.marker_end_ids, lm.device)
        self.graphs = StepGraphs() if self.use_graphs else None
        self.eos = torch.tensor(sorted(setup.eos_ids), device=lm.device)
        table = torch.zeros(len(STOP_CODES), self.prefill_len, dtype=torch.long)
        lens = torch.zeros(len(STOP_CODES), dtype=torch.long)
        for code, name in enumerate(STOP_CODES):
            ids = setup.prefills[name]
            table[code, : len(ids)] = torch.tensor(ids)
            lens[code] = len(ids)
        self.prefill_table, self.prefill_lens = table.to(lm.device), lens.to(lm.device)
        self.s = EngineState.allocate(setup, rows, self.matcher)

    # --- the captured step --------------------------------------------------------------------------

    def _reset(self, prompt_ids: list[list[int]], draws: list[RowDraws]) -> None:
        """Load a new batch into the state; rows past the batch are bucket padding, DONE from the start."""
        s, n, dev = self.s, len(prompt_ids), self.setup.lm.device
        for name, buf in s.tensors(("eps", "u_cot", "u_answer")).items():
            buf[:n].copy_(torch.stack([getattr(d, name) for d in draws]))
        s.phase.fill_(DONE)
        s.phase[:n] = COT
        s.pos.fill_(1)
        s.pos[:n] = torch.tensor([len(p) for p in prompt_ids], device=dev)
        for buf, value in ((s.stop, -1), (s.bad_step, -1), (s.cot_len, 0), (s.pre_ptr, 0), (s.ans_len, 0),
                           (s.t, 0), (s.chars, -1)):
            buf.fill_(value)

    def _step(self, s: EngineState, span: int) -> None:
        """One decode step for every row, all on the device (no host sync): capturable."""
        x, pos = self._run_logic(s)
        h = self.dec.forward(x[:, None], pos[:, None], span)[:, 0]
        self.setup.lm.logits(h, out=s.z)

    def _run_logic(self, s: EngineState):
        if self._logic is not None and not self._logic_checked:  # the first call compiles (and fails before running)
            out = first_call(lambda: self._logic(self, s), "torch.compile of the decode step", "running eagerly")
            if out is not None:
                self._logic_checked = True
                return out[0]
            self._logic = None
        return self._logic(self, s) if self._logic is not None else self._logic_eager(s)

    def _logic_eager(self, s: EngineState) -> tuple[torch.Tensor, torch.Tensor]:
        """Everything of a step but the forward pass: records, phase changes, the step count and positions
        (advanced here, fused with the rest); returns the inputs and the positions they go to."""
        setup, cfg, lm = self.setup, self.setup.cfg, self.setup.lm
        R, L, A = self.rows, cfg.max_cot_length, cfg.max_answer_length
        t, phase, z = s.t, s.phase, s.z
        is_cot, is_pre, is_ans, active = phase == COT, phase == PREFILL, phase == ANSWER, phase != DONE
        rows = torch.arange(R, device=z.device)
        finite = torch.isfinite(cot.blocks(z, 0.0)).all(-1).all(-1)  # in blocks: see cot.blocks
        s.bad_step.copy_(torch.where(active & ~finite & (s.bad_step < 0), t.expand(R), s.bad_step))

        # CoT: the step's input and records at column t. Rows past their CoT write garbage at columns
        # they never read; past L every row writes to the spare column L.
        tcol = t.clamp(max=L)
        pick = (lambda x: None if x is None else x.index_select(1, t.clamp(max=L - 1)).squeeze(1))
        st = cot_step(setup, z, pick(s.eps), pick(s.u_cot))
        s.cot_ids.index_copy_(1, tcol, st.ids[:, None])
        for buf, value in ((s.logprob, st.logprob), (s.entropy, st.entropy), (s.gap, st.gap)):
            buf.index_copy_(1, tcol, value[:, None].to(buf.dtype))
        if s.inputs is not None:
            s.inputs.index_copy_(1, tcol, st.inputs[:, None])
        if s.mu is not None:
            s.mu.index_copy_(1, tcol, st.mu[:, None])
        if st.top is not None:
            s.top_p.index_copy_(1, tcol, st.top[0][:, None])
            s.top_ids.index_copy_(1, tcol, st.top[1][:, None])

        # Answer: a token for every row, kept where the row is answering.
        acol = s.ans_len.clamp(max=A - 1)
        a, a_lp = answer_step(setup, z, None if s.u_answer is None else s.u_answer[rows, acol])
        s.ans_ids[rows, acol] = torch.where(is_ans, a, s.ans_ids[rows, acol])
        s.ans_lp[rows, acol] = torch.where(is_ans, a_lp.to(s.ans_lp.dtype), s.ans_lp[rows, acol])

        # What each row feeds: its CoT input, its next forced prefill token, or its answer token.
        kind = s.stop.clamp(min=0)
        pre_tok = self.prefill_table[kind, s.pre_ptr.clamp(max=self.prefill_len - 1)]
        x = lm.embed(torch.where(is_ans, a, pre_tok))
        x = torch.where(is_cot[:, None], st.inputs.to(x.dtype), x)

        # Phase changes (METHOD.md §3), in rollout.cot_stop's order: marker, then EOS, then length.
        s.chars.copy_(torch.where(is_cot[:, None], self.matcher.append(s.chars, st.ids), s.chars))
        marker = is_cot & self.matcher.ends_with_marker(s.chars, st.ids)
        eos = is_cot & torch.isin(st.ids, self.eos) if cfg.stop_at_eos else torch.zeros_like(is_cot)
        length = is_cot & (t + 1 >= L)
        stop = marker | eos | length
        code = torch.where(marker, 0, torch.where(eos, 2, 1))
        s.stop.copy_(torch.where(stop, code, s.stop))
        s.cot_len.copy_(torch.where(is_cot, t + 1, s.cot_len))
        s.pre_ptr.copy_(s.pre_ptr + is_pre.long())
        pre_done = is_pre & (s.pre_ptr == self.prefill_lens[kind])
        s.ans_len.copy_(s.ans_len + is_ans.long())
        ans_done = is_ans & (torch.isin(a, self.eos) | (s.ans_len == A))
        s.phase.copy_(torch.where(stop, PREFILL, torch.where(pre_done, ANSWER, torch.where(ans_done, DONE, phase))))
        pos = s.pos.clone()
        s.pos.copy_(torch.where(active, pos + 1, pos).clamp(max=self.max_len - 1))
        s.t.add_(1)
        return x, pos

    def _span(self, n: int) -> int:
        """The cache slots a step's attention covers, given the longest row's n: a bucket, so graphs are reused."""
        if not self.use_graphs:
            return n
        if self.dec.kernel:  # it stops at each row's own length: one graph for the whole rollout
            return self.max_len
        return min(_round_up(n, SPAN_BUCKET), self.max_len)

    def _run_step(self, s: EngineState, span: int) -> None:
        if self.graphs is None:
            return self._step(s, span)
        self.graphs.replay(lambda: self._step(s, span), s, span)

    # --- a batch ------------------------------------------------------------------------------------

    @torch.no_grad()
    def decode(self, prompt_ids: list[list[int]], draws: list[RowDraws], keys):
        """Rollout records for up to ``rows`` rows, like ``hf_engine.decode_batch``."""
        lm, cfg = self.setup.lm, self.setup.cfg
        n, R, s = len(prompt_ids), self.rows, self.s
        assert n <= R, f"batch of {n} rows exceeds the engine's {R}"
        self.dec.refresh()  # the weights may have changed since the last call (a training step)
        self._reset(prompt_ids, draws)

        # Prompts, right-padded: each row's cache holds its prompt from slot 0, no gaps. Each distinct prompt is
        # prefilled once, into the first cache rows, then copied to the rows that share it.
        unique, which = unique_prompts(prompt_ids) if cfg.share_prompt else (prompt_ids, list(range(n)))
        ids, _ = lm.pad(unique)
        U, P = ids.shape
        pos = torch.arange(P, device=lm.device)[None].expand(U, P)
        h = self.dec.forward(lm.embed(ids), pos, _round_up(P, SPAN_BUCKET) if self.use_graphs else P)
        which = torch.tensor(which + [0] * (R - n), device=lm.device)  # bucket rows: any prompt, they are DONE
        if U < R:
            for kc, vc in zip(self.dec.k_cache, self.dec.v_cache):
                kc[:R, :, :P] = kc[which, :, :P]
                vc[:R, :, :P] = vc[which, :, :P]
        last = (s.pos - 1).clamp(min=0)
        lm.logits(h[which, last], out=s.z)

        max_steps = cfg.max_cot_length + self.prefill_len + cfg.max_answer_length
        for step in range(max_steps):
            self._run_step(s, self._span(P + step + 1))
            if (step + 1) % SYNC_EVERY == 0 or step + 1 == max_steps or not self.use_graphs:
                bad = s.bad_step[:n]
                if (bad >= 0).any():
                    rows = (bad >= 0).nonzero().flatten().tolist()
                    raise non_finite(int(bad[rows[0]]), rows)
                if bool((s.phase[:n] == DONE).all()):
                    break
        assert bool((s.phase[:n] == DONE).all()), "rollout did not finish within its step bound"
        return self._records(s, prompt_ids, keys)

    def _records(self, s: EngineState, prompt_ids, keys):
        n = len(prompt_ids)
        host = s.to_host(n)
        rows = []
        for r in range(n):
            T, A = int(host["cot_len"][r]), int(host["ans_len"][r])
            reason = STOP_CODES[int(host["stop"][r])]
            rows.append(Row(DONE, host["cot_ids"][r, :T].tolist(), reason, self.setup.prefills[reason], 0,
                             host["ans_ids"][r, :A].tolist(), host["ans_lp"][r, :A].tolist()))
        cot_steps = {name: host[name].transpose(0, 1) if name in host else None
                     for name in ("inputs", "logprob", "entropy", "gap", "mu", "top_p", "top_ids")}
        return records(self.setup, prompt_ids, keys, rows, cot_steps)


def static_engine(setup: RolloutSetup, max_prompt: int, rows: int, cuda_graphs: bool = True) -> StaticEngine:
    """The engine for this call, reused from the last call on the same model when nothing it baked in changed.

    Its cache, state and captured graphs are the expensive part, so a trainer that rolls out every step
    captures once. One engine is kept per model: a new key frees the old one first.
    """
    cfg = setup.cfg
    prefill = max(len(v) for v in setup.prefills.values())
    max_len = _round_up(max_prompt + cfg.max_cot_length + prefill + cfg.max_answer_length + 1, SPAN_BUCKET)
    baked = dataclasses.replace(cfg, seed=0, num_generations=1, batch_size=1)  # what a graph depends on
    key = (repr(setup.cot_cfg), repr(baked), setup.sigma, batch_bucket(rows), cuda_graphs)
    held = setup.lm.__dict__.get("_static_engine")
    if held is not None and held[0] == key and held[1].max_len >= max_len:  # a longer cache serves shorter prompts
        held[1].setup = setup
        return held[1]
    setup.lm.__dict__["_static_engine"] = None  # the old engine is freed here, before the new one allocates
    engine = StaticEngine(setup, max_len, batch_bucket(rows), cuda_graphs)
    setup.lm.__dict__["_static_engine"] = (key, engine)
    return engine
