"""The gateway's side of the service sockets: one ZeroMQ ROUTER that every service connects
to. Submits requests, delivers each request's tokens in index order, fails requests whose
service died, and aborts on behalf of callers who left."""

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec
import zmq
import zmq.asyncio

from baton import protocol as P
from baton.gateway import metrics as M
from baton.gateway.admission import Admission, Admitted
from baton.gateway.prefix_index import PrefixIndex
from baton.gateway.router import Registry, Service, decode_cost, prefill_cost
from baton.sampling_params import SamplingParams
from baton.slo import STEAL_SHARE

log = logging.getLogger("baton.gateway")


LOCAL = "local"  # a prompt prefilled on its decode service


class NoCapacity(RuntimeError):
    pass


class ServiceFailed(RuntimeError):
    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Stream:
    req_id: str
    prefill_id: str
    decode_id: str
    first_index: int = 0  # a resumed stream continues from the tokens already streamed
    prefilling_on_decode: int = 0  # its prompt tokens, in its decode's local_tokens until token 1
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False

    async def tokens(self, deadline: float) -> AsyncIterator[P.TokenOutput]:
        """Tokens in index order (the first comes from prefill, the rest from decode, on
        different sockets), until one carries a finish reason or the `deadline` (monotonic)
        passes."""
        held: dict[int, P.TokenOutput] = {}
        index = self.first_index
        while True:
            try:
                msg = await asyncio.wait_for(self.queue.get(), deadline - time.monotonic())
            except TimeoutError:
                raise ServiceFailed("the request ran past its deadline") from None
            if isinstance(msg, P.RequestError):
                raise ServiceFailed(msg.message, msg.retryable)
            held[msg.index] = msg
            while index in held:
                out = held.pop(index)
                index += 1
                yield out
                if out.finish_reason is not None:
                    self.done = True
                    return


class Backend:
    def __init__(
        self,
        zmq_addr: str,
        admission: Admission,
        local_prefill_tokens: int = 0,
        aggregated: bool = False,
        busy_prefill_tokens: int = 0,
        service_timeout_s: float = 3.0,
        cached_prefill_tokens: int = 0,
        block_size: int = 16,
    ):
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.bind(zmq_addr)
        self.addr = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.registry = Registry(service_timeout_s)
        self.admission = admission
        self.local_prefill_tokens = local_prefill_tokens
        self.busy_prefill_tokens = busy_prefill_tokens
        self.cached_prefill_tokens = cached_prefill_tokens
        self.prefixes = PrefixIndex(block_size)
        self.aggregated = aggregated  # no prefill pool is configured: decodes serve alone
        self.streams: dict[str, Stream] = {}
        self.encode = msgspec.msgpack.Encoder().encode
        self.decode = msgspec.msgpack.Decoder(P.ToGateway).decode
        self.tasks: list[asyncio.Task] = []
        self.on_heartbeat = lambda hb: None

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._reap())]

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.sock.close()
        self.ctx.term()

    @property
    def healthy(self) -> bool:
        decode, prefill = self.registry.pool("decode"), self.registry.pool("prefill")
        return bool(decode and (prefill or self.aggregated))

    def local_decode(
        self, token_ids: list[int], avoid: set[str] = frozenset(), pending: int = 0
    ) -> tuple[Service | None, str]:
        """Conditional disaggregation: the decode that prefills this prompt itself and why
        (LOCAL_PREFILLS' label), or None to hand it off. A turn whose prefix a decode still
        holds (it served the turns before) goes there when at most `cached_prefill_tokens` of
        it are new: that computes only the new tokens and moves no KV. A short prompt costs
        less to prefill on its decode than to hand off; with no prefill pool (aggregated, or
        all prefills gone) every prompt does, rather than fail. And work stealing: a prompt
        within `busy_prefill_tokens` that would queue behind every prefill goes to a decode
        whose own prompts to prefill, this one included, come to at most STEAL_SHARE of the
        shortest prefill queue (its core also decodes: it gets the smaller share); `pending`:
        tokens of earlier prompts of the same request already stolen, not yet sent."""
        if self.cached_prefill_tokens:
            decodes = {s.id: s for s in self.registry.pool("decode") if s.id not in avoid}
            hits = self.prefixes.cached_tokens(token_ids)
            if held := [d for d in hits if d in decodes]:
                # the most of it held; among equals (a shared system prompt) the least loaded
                best = max(held, key=lambda d: (hits[d], -decode_cost(decodes[d])))
                if len(token_ids) - hits[best] <= self.cached_prefill_tokens:
                    return decodes[best], "cached"
        prefills = self.registry.pool("prefill")
        if len(token_ids) <= self.local_prefill_tokens or not prefills:
            return self.registry.pick_decode(avoid), "short"
        if len(token_ids) > self.busy_prefill_tokens:
            return None, ""
        decode = self.registry.pick_decode(avoid)
        queued = min(map(prefill_cost, prefills))
        stolen = pending + len(token_ids)
        if decode is not None and decode.local_tokens + stolen <= STEAL_SHARE * queued:
            return decode, "stolen"
        return None, ""

    def _prefilled_on_decode(self, stream: Stream) -> None:
        if stream.prefilling_on_decode:
            if (decode := self.registry.services.get(stream.decode_id)) is not None:
                decode.local_tokens -= stream.prefilling_on_decode
            stream.prefilling_on_decode = 0

    async def _read(self) -> None:
        while True:
            identity, *frames = await self.sock.recv_multipart()
            try:
                if len(frames) != 1:  # every message is one frame; anything else is garbage
                    raise msgspec.DecodeError(f"{len(frames)} frames")
                msg = self.decode(frames[0])
            except msgspec.DecodeError as e:
                M.BAD_MESSAGES.inc()
                log.warning("dropped a malformed message from %r: %s", identity, e)
                continue
            if isinstance(msg, P.Heartbeat):
                if (previous := self.registry.heartbeat(msg)) is not None:
                    log.error("service %s restarted", previous.id)
                    self.fail_requests(previous)
                self.on_heartbeat(msg)
            elif (stream := self.streams.get(msg.req_id)) is not None:
                stream.queue.put_nowait(msg)
                self._prefilled_on_decode(stream)  # any answer ends its prompt's prefill
                if (
                    isinstance(msg, P.TokenOutput)
                    and msg.index == 0
                    and stream.prefill_id != stream.decode_id
                ):
                    # prefill's part is done; from here a dead decode, not prefill, fails it
                    if (prefill := self.registry.services.get(stream.prefill_id)) is not None:
                        prefill.requests.discard(msg.req_id)

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for service in self.registry.expire():
                log.error("service %s (%s) stopped heartbeating", service.id, service.role)
                self.fail_requests(service)

    def fail_requests(self, service: Service) -> None:
        """A dead service's streams end with a retryable error (failover resumes them); its
        KV cache died with it."""
        self.prefixes.forget(service.id)
        for req_id in service.requests:
            if (stream := self.streams.get(req_id)) is not None:
                if stream.decode_id == service.id:  # counted on the dead one, not a successor
                    stream.prefilling_on_decode = 0
                why = f"{service.role} service {service.id} died"
                stream.queue.put_nowait(P.RequestError(req_id, why, retryable=True))

    async def _send(self, service_id: str, msg) -> bool:
        """False if the service is gone (the reaper fails its requests)."""
        try:
            await self.sock.send_multipart([service_id.encode(), self.encode(msg)])
        except zmq.ZMQError:
            return False
        return True

    def admit(self, prompts: list[list[int]]) -> Admitted:
        """Per prompt, the prefill it is reserved on (its tokens counted there at once, so
        the next admission sees them), LOCAL for one prefilled on its decode; raises
        Overloaded (a 429) when they should not be taken now."""
        local, pending = [], 0
        for ids in prompts:
            decode, why = self.local_decode(ids, pending=pending)
            local.append(decode is not None)
            pending += len(ids) if why == "stolen" else 0
        remote = [ids for ids, here in zip(prompts, local, strict=True) if not here]
        admitted = self.admission.check(self.registry, len(self.streams), len(prompts), remote)
        reserved = iter(admitted.prefills)
        admitted.prefills = [LOCAL if here else next(reserved) for here in local]
        return admitted

    async def submit(
        self,
        token_ids: list[int],
        params: SamplingParams,
        prefill_id: str | None = None,
        num_prompt_tokens: int = -1,
        avoid: set[str] = frozenset(),
    ) -> Stream:
        """Send a request on its way; with `num_prompt_tokens` < len(token_ids) it resumes
        one whose tokens after the prompt were already streamed, away from the services in
        `avoid` where others are live (a prefill left with none: on the decode)."""
        local, why = (None, "")
        if prefill_id in (None, LOCAL):
            local, why = self.local_decode(token_ids, avoid)
        if prefill_id == LOCAL and local is None:  # admitted to prefill on a decode: keep it so
            local, why = self.registry.pick_decode(avoid), "short"
        decode = local or self.registry.pick_decode(avoid)
        if local is not None:
            prefill = local
        else:
            prefill = self.registry.services.get(prefill_id or "")
            prefill = prefill or self.registry.pick_prefill(len(token_ids), avoid) or decode
        if prefill is None or decode is None:
            raise NoCapacity("no prefill or no decode service is available")
        req_id = uuid.uuid4().hex  # the transfer id both legs carry
        resumed = len(token_ids) - num_prompt_tokens if num_prompt_tokens >= 0 else 0
        stream = Stream(req_id, prefill.id, decode.id, first_index=resumed)
        if prefill is decode:
            M.LOCAL_PREFILLS.labels(why or "no prefill").inc()
            decode.local_tokens += len(token_ids)
            stream.prefilling_on_decode = len(token_ids)
        self.streams[req_id] = stream
        prefill.requests.add(req_id)
        decode.requests.add(req_id)
        request = P.PrefillRequest(
            req_id, token_ids, params, decode.id, decode.kv_addr, num_prompt_tokens
        )
        if await self._send(prefill.id, request):  # it counts what reaches it (Load)
            prefill.sent_prompt(len(token_ids))
        return stream

    async def finish(self, stream: Stream, token_ids: list[int] | None = None) -> None:
        """Forget a stream; if it has not ended, abort it on both services. `token_ids`: its
        prompt and output, whose KV its decode now caches (a next turn may reuse it)."""
        self.streams.pop(stream.req_id, None)
        if token_ids and (decode := self.registry.services.get(stream.decode_id)) is not None:
            self.prefixes.add(decode.id, token_ids, decode.load.total_blocks)
        self._prefilled_on_decode(stream)
        for sid in (stream.prefill_id, stream.decode_id):
            if (s := self.registry.services.get(sid)) is not None:
                s.requests.discard(stream.req_id)
        if not stream.done:
            for sid in {stream.prefill_id, stream.decode_id}:
                await self._send(sid, P.Abort(stream.req_id))
