"""Continuous batching with chunked prefill and recompute preemption (plain Python, no torch).

Each step spends a token budget: running sequences first (a decode costs one token, an
unfinished prompt its next chunk), then waiting ones. Both queues are kept in order of the
request's priority (SamplingParams.priority, lower first), then of arrival. When blocks run
out the last running sequence (the least urgent, the newest among equals) is preempted: its
blocks are freed and it recomputes later (its full blocks usually come back as prefix-cache
hits).
"""

from collections import deque
from dataclasses import dataclass

from baton.cache.kv_manager import KVCacheManager
from baton.request import FinishReason, Logprob, SeqStatus, Sequence, check_stop


def chunk_cap(budget: int, max_chunk: int | None, competing: int) -> int:
    """Prompt tokens one sequence may take in a step of `budget` with `competing` sequences
    scheduled, itself included: the whole budget alone; else `max_chunk` (default: half the
    budget), so a short prompt that arrives behind a long one starts at the next step."""
    return budget if competing <= 1 else max_chunk or max(1, budget // 2)


def tokens_ahead(left: list[int], budget: int, chunk: int, max_steps: int = 256) -> int:
    """Tokens computed before a newcomer gets its first chunk, with `left` tokens to go per
    queued prompt: schedule() played forward (first come first served, each prompt at most
    `chunk` a step while others wait). Behind a long prompt that is one chunk, not all of
    it; past `max_steps`, the rest of the queue counts whole."""
    left, done = list(left), 0
    for _ in range(max_steps):
        room = budget
        for i, n in enumerate(left):
            take = min(n, room, chunk)
            left[i] -= take
            room -= take
            done += take
        if room > 0:  # the newcomer's first chunk runs in this step
            return done
        left = [n for n in left if n]
    return done + sum(left)


def insert_by_priority(queue: list[Sequence] | deque[Sequence], seq: Sequence, ahead: bool) -> None:
    """Put `seq` after every sequence more urgent than it, and after (or, `ahead`, before)
    those as urgent: the queue stays ordered by priority, then arrival."""
    p = seq.params.priority
    if not ahead and (not queue or queue[-1].params.priority <= p):
        queue.append(seq)  # the common case: all of one priority
        return
    for i, other in enumerate(queue):
        if other.params.priority > p or (ahead and other.params.priority == p):
            queue.insert(i, seq)
            return
    queue.append(seq)


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the end of the sequence, so its logits give a token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SampledToken:
    token_id: int
    logprob: Logprob | None = None


class Scheduler:
    def __init__(
        self,
        kv: KVCacheManager,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: frozenset[int],
        max_chunk_tokens: int | None = None,
        vocab_size: int | None = None,
        window: int | None = None,
    ):
        """window: every layer of the model slides over this many positions; the blocks behind
        it go back to the pool as each sequence moves on (KVCacheManager.free_behind)."""
        self.kv, self.window = kv, window
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        # a prompt's tokens per step while others wait (chunk_cap)
        self.max_chunk_tokens = chunk_cap(max_num_batched_tokens, max_chunk_tokens, 2)
        self.max_model_len = max_model_len
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size  # None: token ids are not checked
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        # handed off by a prefill, their KV on its way (WAITING_FOR_KV), in order of offer
        self.waiting_for_kv: dict[str, Sequence] = {}
        # prompts whose prefix blocks are being read from the KV tier, by request id
        self.loading: dict[str, Sequence] = {}
        self.num_tier_hit_tokens = 0  # prompt tokens whose KV the tier gave, ever
        self.num_preemptions = 0  # sequences sent back to recompute, ever
        self.num_prefix_hit_tokens = 0  # prompt tokens whose KV the prefix cache gave, ever
        # prompt tokens a step may take beside sequences that decode in it (None: the whole
        # budget): a service paces them to its TPOT target (baton.slo.PromptPacer)
        self.prompt_cap: int | None = None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.loading)

    def check_fits(self, num_tokens: int, max_new_tokens: int) -> None:
        """Raise a ValueError naming the numbers if a request can never be served here."""
        if num_tokens >= self.max_model_len:
            raise ValueError(
                f"prompt has {num_tokens} tokens; the context limit is {self.max_model_len} "
                "(prompt + at least one new token)"
            )
        need = self.kv.blocks_needed(min(num_tokens + max_new_tokens, self.max_model_len))
        if self.window:  # behind the window blocks go back, but a prompt is reserved whole
            # (handed off: all its blocks at once) and a prefix hit may hold all of it
            bound = self.kv.blocks_needed(self.window + self.max_num_batched_tokens) + 1
            need = min(need, max(bound, self.kv.blocks_needed(num_tokens + 1)))
        if need > self.kv.pool.num_blocks:
            raise ValueError(
                f"request needs up to {need} KV blocks ({num_tokens} prompt + {max_new_tokens} "
                f"new tokens); the pool holds {self.kv.pool.num_blocks}"
            )

    def check_request(self, seq: Sequence) -> None:
        """Raise a ValueError if `seq` can never run here; a token id outside the vocabulary
        would crash the forward (it indexes the embedding)."""
        if not seq.token_ids:
            raise ValueError("prompt is empty")
        ids, stops = seq.token_ids, seq.params.stop_token_ids
        if self.vocab_size is not None and (min(ids) < 0 or max(ids) >= self.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.vocab_size})")
        if self.vocab_size is not None and any(not 0 <= t < self.vocab_size for t in stops):
            # the sampler bans stop ids before min_tokens by indexing the logits
            raise ValueError(f"stop_token_ids must be in [0, {self.vocab_size})")
        if self.vocab_size is not None and any(
            not 0 <= t < self.vocab_size for t, _ in seq.params.logit_bias
        ):  # the sampler adds the bias by indexing the logits too
            raise ValueError(f"logit_bias token ids must be in [0, {self.vocab_size})")
        self.check_fits(seq.num_tokens, seq.params.max_tokens - seq.num_output_tokens)

    def add(self, seq: Sequence) -> None:
        self.check_request(seq)
        insert_by_priority(self.waiting, seq, ahead=False)

    # --- a prompt whose KV another service computed (the decode's side of a hand-off) ----
    def add_remote(self, seq: Sequence) -> None:
        """Take `seq` to run once its KV has landed; raises ValueError if it never can."""
        self.check_request(seq)
        seq.status = SeqStatus.WAITING_FOR_KV
        self.waiting_for_kv[seq.req_id] = seq

    def update_remote(self, seq: Sequence, token_ids: list[int], params) -> None:
        """A later offer of the same prompt (streamed: the final one adds token 0)."""
        candidate = Sequence(seq.req_id, token_ids, params, seq.num_prompt_tokens)
        self.check_request(candidate)
        seq.token_ids, seq.params = candidate.token_ids, params

    def reserve_remote(self, seq: Sequence, num_tokens: int) -> bool:
        """Reserve blocks for `num_tokens` of `seq`'s KV, all at once (a streamed prompt's
        reads never wait on blocks that others hold half of), keeping enough free for the
        running batch to grow by one block each; False while they do not fit. The leading
        blocks this pool caches already (an agent's earlier turns it decoded) are shared, not
        reserved: `seq.num_cached_blocks` of them, which the hand-off does not read."""
        if seq.block_ids:
            return True
        self.kv.match_prefix(seq)
        need = self.kv.blocks_needed(num_tokens) - len(seq.block_ids)
        if need + len(self.running) > self.kv.pool.num_free:
            self._unmatch(seq)  # the shared ones back, until the rest fits
            return False
        self.num_prefix_hit_tokens += seq.num_computed_tokens
        self.kv.allocate(seq, num_tokens - seq.num_computed_tokens)
        return True

    def kv_landed(self, seq: Sequence, num_computed: int) -> None:
        """Its KV up to `num_computed` is in its blocks: it joins the queue to run."""
        del self.waiting_for_kv[seq.req_id]
        self._keep_landed(seq, num_computed)
        seq.status = SeqStatus.WAITING
        insert_by_priority(self.waiting, seq, ahead=False)

    def _keep_landed(self, seq: Sequence, num_computed: int) -> None:
        """KV up to `num_computed` landed in `seq`'s blocks (from a peer, or the KV tier): the
        blocks reserved beyond it go back, the ones it fills are published for prefix hits."""
        keep = self.kv.blocks_needed(num_computed)  # more were reserved than landed
        self.kv.pool.release(seq.block_ids[keep:])
        del seq.block_ids[keep:]
        seq.num_computed_tokens = num_computed
        self.kv.cache_computed(seq)

    def drop_remote(self, seq: Sequence, free: bool = True) -> None:
        """The hand-off ended before the KV landed. `free=False`: a transfer that cannot be
        stopped may still write its blocks, which then never return to the pool."""
        del self.waiting_for_kv[seq.req_id]
        if free:
            self.kv.free(seq)
        seq.finish(FinishReason.ABORT)

    def release_blocks(self, seq: Sequence) -> None:
        """Free the blocks of a sequence dropped with `free=False`, once nothing writes them."""
        self.kv.free(seq)

    # --- the prefill's side: a prompt handed off leaves, its KV pinned by the lease -------
    def hand_off(self, seq: Sequence) -> None:
        """`seq`'s first token is out and its KV is offered: it leaves this service; the
        blocks stay as long as the hand-off pins them."""
        self.running.remove(seq)
        self.kv.free(seq)

    def abort(self, req_id: str) -> Sequence | None:
        if (seq := self.loading.get(req_id)) is not None:  # its blocks free once read
            if seq.is_finished:
                return None
            seq.finish(FinishReason.ABORT)
            return seq
        for queue in (self.running, self.waiting):
            for seq in queue:
                if seq.req_id == req_id:
                    queue.remove(seq)
                    self.kv.free(seq)
                    seq.finish(FinishReason.ABORT)
                    return seq
        return None

    def _unmatch(self, seq: Sequence) -> None:
        """Its blocks back (a prefix hit's shares too), and nothing of it computed."""
        self.kv.free(seq)
        seq.num_computed_tokens = 0

    def _preempt(self, seq: Sequence) -> None:
        self.num_preemptions += 1
        self._unmatch(seq)
        seq.status = SeqStatus.WAITING
        insert_by_priority(self.waiting, seq, ahead=True)  # it was running: first among equals

    def _chunk(self, seq: Sequence, budget: int, prompt_room: int) -> int:
        """Its tokens this step: a decode's one, or a prompt's next chunk (0: no room)."""
        left = seq.num_tokens - seq.num_computed_tokens
        if left == 1:
            return 1
        competing = len(self.running) + len(self.waiting)
        cap = chunk_cap(self.max_num_batched_tokens, self.max_chunk_tokens, competing)
        return min(left, budget, cap, prompt_room)

    def num_decoding(self) -> int:
        """Running sequences past their prompts (one token to compute a step)."""
        return sum(s.num_tokens - s.num_computed_tokens == 1 for s in self.running)

    def _prompt_room(self) -> int:
        """Prompt tokens this step may take: `prompt_cap` while any running sequence decodes."""
        if self.prompt_cap is None or not self.num_decoding():
            return self.max_num_batched_tokens
        return self.prompt_cap

    def _tokens_left(self) -> list[int]:
        return [s.num_tokens - s.num_computed_tokens for s in (*self.running, *self.waiting)]

    def queued_tokens(self) -> int:
        """Prompt tokens waiting or being computed."""
        return sum(self._tokens_left())

    def ahead_tokens(self) -> int:
        """Prompt tokens computed before a prompt arriving now gets its first chunk."""
        return tokens_ahead(self._tokens_left(), self.max_num_batched_tokens, self.max_chunk_tokens)

    # --- the KV tier: a prompt's prefix the pool lost, read back instead of computed ------
    def _load_from_tier(self, seq: Sequence) -> bool:
        """After its pool prefix hit: if the tier holds more of the prompt and there are
        blocks for it, `seq` leaves the queue until they are read (`_tier_landed`)."""
        hashes = self.kv.tier_prefix(seq)
        if not hashes or len(hashes) + len(self.running) > self.kv.pool.num_free:
            return False
        if seq.req_id in self.loading:  # an aborted one of the same id still loads: compute
            return False
        blocks = self.kv.pool.allocate(len(hashes))
        seq.block_ids.extend(blocks)
        self.waiting.popleft()
        seq.status = SeqStatus.WAITING_FOR_KV
        self.loading[seq.req_id] = seq
        self.kv.tier.load(seq.req_id, list(zip(blocks, hashes, strict=True)))
        return True

    def _tier_landed(self) -> None:
        """Loads that finished: their sequences queue first among equals (they were next)."""
        for req_id, n in self.kv.tier.landed():
            seq = self.loading.pop(req_id)
            pool_hit = seq.num_computed_tokens
            # the pool's hit, then what was read; that serves later prompts in any case
            self._keep_landed(seq, (seq.num_cached_blocks + n) * self.kv.block_size)
            if seq.is_finished:  # aborted meanwhile
                self.kv.free(seq)
                continue
            self.num_prefix_hit_tokens += pool_hit
            self.num_tier_hit_tokens += n * self.kv.block_size
            seq.status = SeqStatus.WAITING
            insert_by_priority(self.waiting, seq, ahead=True)

    def schedule(self) -> list[ScheduledSeq]:
        if self.loading:
            self._tier_landed()
        budget, prompt_room = self.max_num_batched_tokens, self._prompt_room()
        out: list[ScheduledSeq] = []
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = self._chunk(seq, budget, prompt_room)
            if n == 0:  # a prompt with no room this step: the decodes beside it go on
                i += 1
                continue
            while not self.kv.can_allocate(seq, n):
                victim = self.running.pop()
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.kv.allocate(seq, n)
                out.append(ScheduledSeq(seq, n))
                budget -= n
                if seq.num_tokens - seq.num_computed_tokens > 1:  # a prompt's chunk
                    prompt_room -= n
                i += 1
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq, hit = self.waiting[0], 0
            if seq.num_computed_tokens == 0:  # else its KV came with it (a hand-off)
                self.kv.match_prefix(seq)
                if self._load_from_tier(seq):
                    continue
                hit = seq.num_computed_tokens
            n = self._chunk(seq, budget, prompt_room)
            if n == 0 or not self.kv.can_allocate(seq, n):
                self._unmatch(seq)  # give back the prefix hit until it fits
                break
            self.kv.allocate(seq, n)
            self.waiting.popleft()
            self.num_prefix_hit_tokens += hit
            seq.status = SeqStatus.RUNNING
            insert_by_priority(self.running, seq, ahead=False)
            out.append(ScheduledSeq(seq, n))
            budget -= n
            if seq.num_tokens - seq.num_computed_tokens > 1:
                prompt_room -= n
        return out

    def postprocess(
        self, scheduled: list[ScheduledSeq], sampled: list[SampledToken | None]
    ) -> list[Sequence]:
        """Advance the sequences past this step; return those that finished."""
        finished = []
        for s, out in zip(scheduled, sampled, strict=True):
            seq = s.seq
            seq.num_computed_tokens += s.num_new_tokens
            self.kv.cache_computed(seq)
            if self.window:
                self.kv.free_behind(seq, self.window)
            if out is None:
                continue
            seq.token_ids.append(out.token_id)
            if out.logprob is not None:
                seq.logprobs.append(out.logprob)
            reason = check_stop(seq, self.eos_token_ids, self.max_model_len)
            if reason is not None:
                self.finish(seq, reason)
                finished.append(seq)
        return finished

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        """End a running sequence and free its blocks."""
        self.running.remove(seq)
        self.kv.free(seq)
        seq.finish(reason)
