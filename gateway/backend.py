"""The gateway's side of the service sockets: one ZeroMQ ROUTER that every service connects
to. Submits requests, delivers each request's tokens in index order, fails requests whose
service died, and aborts on behalf of callers who left."""

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import zmq
import zmq.asyncio
from msgspec.structs import replace

from baton import protocol as P
from baton.config import SLOConfig
from baton.gateway import metrics as M
from baton.gateway.admission import Admission, Admitted
from baton.gateway.autoscale import Autoscaler
from baton.gateway.openai_types import BadRequest
from baton.gateway.router import Placement, Router, Service, Why
from baton.logs import ThrottledLog
from baton.plane import Authenticator, Keys, may_speak_for, peer_key
from baton.sampling_params import SamplingParams

log = logging.getLogger("baton.gateway")

MAX_MESSAGE_BYTES = 4 << 20  # what a service sends the gateway: tokens, heartbeats, errors
MAX_ABORTED = 4096  # aborted req_ids remembered, so trailing tokens are not aborted again


class ServiceFailed(RuntimeError):
    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


@dataclass
class Stream:
    req_id: str
    prefill_id: str
    decode_id: str
    salt: bytes | None = None  # its cache salt: the prefix index files its blocks under it
    first_index: int = 0  # a resumed stream continues from the tokens already streamed
    num_prompt_tokens_on_decode: int = 0  # in its decode's local_tokens until an answer comes
    kept: bool = False  # it decodes on a prefill (Why.KEPT): counted in that one's `kept`
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
        router: Router,
        aggregated: bool,
        keys: Keys | None = None,
        autoscaler: Autoscaler | None = None,
    ):
        """keys: the service plane's (baton.plane); None: a plain socket. autoscaler: what
        the pools' desired sizes are decided by (the default SLO's when None)."""
        self.ctx = zmq.asyncio.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
        self.authenticator = None
        if keys is not None:
            self.authenticator = Authenticator(zmq.Context.shadow(self.ctx), keys)
            keys.serve(self.sock)
        self.sock.bind(zmq_addr)
        self.addr = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.admission = admission
        self.router = router
        self.registry = router.registry  # fed by the heartbeats read here
        self.aggregated = aggregated  # the prefill pool may be empty: decodes serve alone
        self.autoscaler = autoscaler or Autoscaler(SLOConfig())
        self.streams: dict[str, Stream] = {}
        # prompts admitted and not yet answered: what admission counts. Not len(streams): a
        # stream exists once its response starts, after the handler returned, so a burst of
        # streaming requests all saw the same count (reliability review M3)
        self.inflight = 0
        self.aborted: OrderedDict[str, None] = OrderedDict()  # the latest, at most MAX_ABORTED
        self.codec = P.Codec(P.ToGateway, self._count_bad)
        self.tasks: list[asyncio.Task] = []
        self.on_heartbeat = lambda hb: None
        self.bad_log = ThrottledLog(log)  # what any peer can send us: counted, seldom logged

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._reap())]

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        self.sock.close()
        if self.authenticator is not None:
            self.authenticator.stop()
        self.ctx.term()

    @property
    def healthy(self) -> bool:
        decode, prefill = self.registry.pool("decode"), self.registry.pool("prefill")
        return bool(decode and (prefill or self.aggregated))

    def _end_prefill_on_decode(self, stream: Stream) -> None:
        if stream.num_prompt_tokens_on_decode:
            if (decode := self.registry.services.get(stream.decode_id)) is not None:
                decode.local_tokens -= stream.num_prompt_tokens_on_decode
            stream.num_prompt_tokens_on_decode = 0

    def _count_bad(self, e: Exception) -> None:
        M.BAD_MESSAGES.inc()
        self.bad_log.warning("dropped a malformed message: %s", e)

    async def _read(self) -> None:
        while True:
            identity, *frames = await self.sock.recv_multipart(copy=False)
            sender = identity.bytes.decode(errors="replace")
            if len(frames) != 1:  # every message is one frame; anything else is garbage
                self._count_bad(ValueError(f"{len(frames)} frames from {sender!r}"))
                continue
            if (msg := self.codec.try_decode(frames[0].buffer)) is None:
                continue
            if (why := self._untrusted(msg, sender, frames[0])) is not None:
                self._count_bad(ValueError(why))
                continue
            if isinstance(msg, P.Heartbeat):
                known = self.registry.services.get(msg.service_id)
                if (previous := self.registry.heartbeat(msg)) is not None:
                    log.error("service %s restarted", previous.id)
                    self.fail_requests(previous)
                if known is None or previous is not None:  # what does its cache hold?
                    await self._send(msg.service_id, P.CacheResync())
                self.on_heartbeat(msg)
            elif isinstance(msg, P.CacheEvents):
                await self._on_cache_events(sender, msg)
            elif (stream := self.streams.get(msg.req_id)) is not None:
                if sender not in (stream.prefill_id, stream.decode_id):
                    self._count_bad(ValueError(f"{sender!r} answered for {msg.req_id}"))
                    continue
                stream.queue.put_nowait(msg)
                self._end_prefill_on_decode(stream)  # any answer ends its prompt's prefill
                if (
                    isinstance(msg, P.TokenOutput)
                    and msg.index > stream.first_index
                    and stream.prefill_id != stream.decode_id
                ):
                    # the decode computed a token, so the prompt's KV reached it: from here a
                    # dead decode, not prefill, fails it. Not at the prefill's token: its death
                    # before the KV moved would stall the stream until the decode's transfer
                    # timeout (reliability review M4)
                    if (prefill := self.registry.services.get(stream.prefill_id)) is not None:
                        prefill.requests.discard(msg.req_id)
            elif isinstance(msg, P.TokenOutput) and msg.finish_reason is None:
                await self._abort_orphan(sender, msg.req_id)

    async def _on_cache_events(self, sender: str, batch: P.CacheEvents) -> None:
        """What a service's prefix cache gained and lost (gateway.prefix_index). One not
        registered yet is asked for a snapshot once it is."""
        if (service := self.registry.services.get(sender)) is None:
            return
        if self.router.prefixes.apply(sender, batch, held_blocks(service)):
            await self._send(sender, P.CacheResync())

    async def _abort_orphan(self, sender: str, req_id: str) -> None:
        """Tokens of a request nobody here waits for: one of an earlier gateway on this
        address (restarted: its services were never told) or one aborted moments ago. Aborted
        once, so nothing runs to max_tokens for nobody (reliability review M11)."""
        if req_id in self.aborted:
            return
        self.aborted[req_id] = None
        if len(self.aborted) > MAX_ABORTED:
            self.aborted.popitem(last=False)
        if await self._send(sender, P.Abort(req_id)):
            M.ORPHANS_ABORTED.inc()

    def _untrusted(self, msg, sender: str, frame: zmq.Frame) -> str | None:
        """Why a message is refused, or None. A heartbeat comes from its service's heartbeat
        socket; on an authenticated plane, every message from a key that speaks for the
        service it comes from (baton.plane.may_speak_for): a heartbeat's claimed role and id,
        else the registered service's (one not registered: the key's own role). A plain plane
        asks the frame nothing: a token message is the hot path, and on a plain socket
        asking for its User-Id raises."""
        heartbeat = isinstance(msg, P.Heartbeat)
        if heartbeat and sender != f"{msg.service_id}/heartbeats":
            return f"{sender!r} sent {msg.service_id}'s heartbeat"
        if self.authenticator is None:
            return None
        key = peer_key(frame)
        if heartbeat:
            service_id, role = msg.service_id, msg.role
        else:
            service = self.registry.services.get(sender)
            service_id, role = sender, service.role if service else (key or "").split(".")[0]
        if not may_speak_for(key, role, service_id):
            return f"{service_id} ({role}) spoke with the {key} key"
        return None

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.reap()

    def reap(self) -> None:
        """Services silent past their timeout are dead: their requests fail over, and their
        metrics series go (a restarted service's id is new: they would pile up)."""
        for service in self.registry.expire():
            log.error("service %s (%s) stopped heartbeating", service.id, service.role)
            self.fail_requests(service)
            M.forget_service(service.id, service.role)
        for pool, count in self.autoscaler.decide(self.registry).items():
            M.DESIRED_REPLICAS.labels(pool).set(count)

    def fail_requests(self, service: Service) -> None:
        """A dead service's streams end with a retryable error (failover resumes them); its
        KV cache died with it."""
        self.router.prefixes.forget(service.id)
        for req_id in service.requests:
            if (stream := self.streams.get(req_id)) is not None:
                if stream.decode_id == service.id:  # counted on the dead one, not a successor
                    stream.num_prompt_tokens_on_decode = 0
                why = f"{service.role} service {service.id} died"
                stream.queue.put_nowait(P.RequestError(req_id, why, retryable=True))

    async def _send(self, service_id: str, msg) -> bool:
        """False if the service is gone (the reaper fails its requests) or takes no more
        (its queue full: it stopped reading); never waits."""
        try:
            frames = [service_id.encode(), self.codec.encode(msg)]
            await self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # EHOSTUNREACH (ROUTER_MANDATORY), or EAGAIN
            return False
        return True

    def admit(self, prompts: list[list[int]], salt: bytes | None = None) -> Admitted:
        """Where each prompt goes, counted on its services at once (the next admission sees
        it); raises Overloaded (a 429) when the request should not be taken now, NoCapacity
        when no decode is there to take it."""
        if len(prompts) > (most := self.admission.max_inflight):  # a 429 would say "retry"
            raise BadRequest(
                f"{len(prompts)} prompts in one request; at most {most} are served at once "
                "([gateway] max_queued_requests)", "prompt",
            )  # fmt: skip
        for prompt in prompts:  # asked for, whether admitted or not
            self.autoscaler.demand(len(prompt))
        placements = self.router.place(prompts, set(), salt)
        load = 0.0  # only admission_load reads it (a sum over the window's requests)
        if self.admission.keeping_up_below:
            load = self.autoscaler.offered_load(self.registry)
        admitted = self.admission.check(self.inflight, placements, load)
        self.router.reserve(admitted.placements)
        self.inflight += len(admitted.placements)
        return admitted

    def release(self, admitted: Admitted) -> None:
        """An admitted request has ended (or never started): its slots are free. Idempotent:
        both the response's end and its generators' cleanup call it."""
        if not admitted.released:
            admitted.released = True
            self.inflight -= len(admitted.placements)

    def place(self, token_ids: list[int], avoid: set[str], salt: bytes | None) -> Placement:
        """A stream to resume: placed away from `avoid`, with no admission (it was admitted)."""
        (placement,) = self.router.place([token_ids], avoid, salt)
        self.router.reserve([placement])
        return placement

    async def submit(
        self,
        placement: Placement,
        token_ids: list[int],
        params: SamplingParams,
        num_prompt_tokens: int | None = None,
    ) -> Stream:
        """Send a request on its way as placed; with `num_prompt_tokens` it resumes one whose
        tokens after the prompt were already streamed."""
        if not (self.registry.live(placement.decode) and self.registry.live(placement.prefiller)):
            # one of its services left since admission (what it reserved, a heartbeat forgets)
            placement = self.place(token_ids, set(), params.cache_salt)
        decode, prefill = placement.decode, placement.prefiller
        decode.reserved_requests = max(0, decode.reserved_requests - 1)
        req_id = uuid.uuid4().hex  # the transfer id both legs carry
        resumed = 0 if num_prompt_tokens is None else len(token_ids) - num_prompt_tokens
        stream = Stream(req_id, prefill.id, decode.id, params.cache_salt, first_index=resumed)
        if placement.why is not Why.REMOTE:
            M.LOCAL_PREFILLS.labels(placement.why.value).inc()
            decode.local_tokens += len(token_ids)
            stream.num_prompt_tokens_on_decode = len(token_ids)
        if placement.why is Why.KEPT:
            decode.kept += 1
            stream.kept = True
        self.streams[req_id] = stream
        prefill.requests.add(req_id)
        decode.requests.add(req_id)
        # stop strings are the gateway's alone to match: they never travel (reliability H3)
        sent = replace(params, stop=()) if params.stop else params
        request = P.PrefillRequest(
            req_id, token_ids, sent, decode.id, decode.kv_addr, num_prompt_tokens
        )
        if await self._send(prefill.id, request):  # it counts what reaches it (Load)
            prefill.sent_prompt(len(token_ids))
            if prefill is not decode:  # its prefix cache now holds the prompt
                self.router.prefixes.add(prefill.id, token_ids, held_blocks(prefill), stream.salt)
        else:  # it never got there: failover places it again now, not at the deadline (M5)
            why = f"{prefill.role} service {prefill.id} is unreachable"
            stream.queue.put_nowait(P.RequestError(req_id, why, retryable=True))
        return stream

    async def finish(self, stream: Stream, token_ids: list[int] | None = None) -> None:
        """Forget a stream; if it has not ended, abort it on both services. `token_ids`: its
        prompt and output, whose KV its decode now caches (a next turn may reuse it)."""
        self.streams.pop(stream.req_id, None)
        decode = self.registry.services.get(stream.decode_id)
        if token_ids and decode is not None and decode.role == "decode":  # not a kept one's
            # the last token was sampled, never fed: its KV was not computed
            self.router.prefixes.add(decode.id, token_ids[:-1], held_blocks(decode), stream.salt)
        self._end_prefill_on_decode(stream)
        if stream.kept and (prefill := self.registry.services.get(stream.decode_id)) is not None:
            prefill.kept -= 1
            stream.kept = False
        for sid in (stream.prefill_id, stream.decode_id):
            if (s := self.registry.services.get(sid)) is not None:
                s.requests.discard(stream.req_id)
        if not stream.done:
            self.aborted[stream.req_id] = None  # its trailing tokens are not orphans
            for sid in {stream.prefill_id, stream.decode_id}:
                await self._send(sid, P.Abort(stream.req_id))


def held_blocks(service: Service) -> int:
    """Blocks a service's prefix cache can hold: its pool's, and its KV tier's."""
    return service.load.total_blocks + service.load.tier_capacity_blocks
