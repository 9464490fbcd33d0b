"""`baton up --autoscale`: the cores split between the pools as the load's mix wants. Chat
(short prompts, a few answers at a time) keeps one decode engine on both cores (aggregated);
long prompts arriving while the decode batch is full move a core to a prefill engine; chat
alone again moves it back. Every request is answered, and wherever it ran its greedy tokens
equal transformers'."""

import os
import random
import threading
import time

import httpx
from reference import hf_greedy
from stack import Stack
from tiny_models import make_tiny_model

SEED = 20261207
CHAT = (4, 48)  # prompts of a few tokens, answers of 48
LONG = (2600, 8)  # prompts a core takes a few hundred ms for, answers of 8


def prompts(n: int, length: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, 49152) for _ in range(length + i)] for i in range(n)]


class Load:
    """`workers` clients, each sending the next of `batch` as soon as its last was answered,
    until finished: what came back, per prompt."""

    def __init__(self, url: str, batch: list[list[int]], new: int, workers: int):
        self.batch, self.new = batch, new
        self.answers: list[tuple[int, int, list[int]]] = []  # (prompt, status, tokens)
        self.stop = threading.Event()
        self.sent = 0
        body = {"max_tokens": new, "temperature": 0, "ignore_eos": True, "return_token_ids": True}

        def client() -> None:
            with httpx.Client(base_url=url, timeout=120) as http:
                while not self.stop.is_set():
                    i, self.sent = self.sent % len(batch), self.sent + 1
                    try:
                        r = http.post("/v1/completions", json={**body, "prompt": batch[i]})
                    except httpx.HTTPError:  # a reset or a timeout: lost
                        self.answers.append((i, 0, []))
                        continue
                    tokens = r.json()["choices"][0]["token_ids"] if r.status_code == 200 else []
                    self.answers.append((i, r.status_code, tokens))

        self.threads = [threading.Thread(target=client) for _ in range(workers)]
        for t in self.threads:
            t.start()

    def finish(self) -> "Load":
        self.stop.set()
        for t in self.threads:
            t.join()
        return self


def until(done, timeout_s: float) -> bool:
    """Whether done() came true (polled each half second) within the timeout."""
    deadline = time.monotonic() + timeout_s
    while not (ok := done()) and time.monotonic() < deadline:
        time.sleep(0.5)
    return ok


def test_the_split_follows_the_mix_and_loses_no_request(tmp_path, smollm2_dir):
    print("seed", SEED)
    rng = random.Random(SEED)
    model = make_tiny_model(
        tmp_path, "llama", seed=3, tokenizer_from=smollm2_dir, hidden_size=128,
        intermediate_size=256, num_hidden_layers=4, max_position_embeddings=4096,
    )  # fmt: skip
    config = tmp_path / "baton.toml"
    # a move once wanted for 3 s over a 3 s window; a TTFT target between the two mixes' (a
    # chat prompt's is a few ms, a long one's a few hundred); no TPOT pressure, but a decode
    # full at 4 sequences (2 chat clients leave it half its slack, 4 none); every prompt
    # computed (no prefix cache) and every request taken (no admission by SLO)
    config.write_text(
        "[autoscale]\nmax_services = 2\nwindow_s = 3.0\ndown_after_s = 3.0\n"
        "[slo]\nttft_ms = 150\ntpot_ms = 1000\n[decode]\nmax_num_seqs = 4\n"
        "[engine]\nenable_prefix_caching = false\n[gateway]\nadmission = 'queue-limit'\n"
    )
    chat, long = prompts(4, CHAT[0], rng), prompts(4, LONG[0], rng)
    stack = Stack(tmp_path / "logs", model, "--config", str(config), prefill=0)
    up_log = tmp_path / "logs-up.log"
    loads = []
    try:

        def split() -> dict[str, int]:
            health = stack.health("gateway")
            return {role: health[role] for role in ("prefill", "decode")}

        assert split() == {"prefill": 0, "decode": 1}  # as configured: one engine, both cores
        loads.append(Load(stack.url, chat, CHAT[1], workers=2))
        time.sleep(4)  # more than a window of chat
        assert stack.health("gateway")["desired"] == {"prefill": 0, "decode": 2}
        assert "autoscale" not in up_log.read_text()  # nothing moved
        loads.append(Load(stack.url, chat, CHAT[1], workers=2))  # 4 chats: the batch is full
        loads.append(Load(stack.url, long, LONG[1], workers=2))
        # a prefill and a decode on a core each, and the engine on both drained
        assert until(lambda: "decode-0 drains" in up_log.read_text(), 120), stack.logs()
        assert until(lambda: split() == {"prefill": 1, "decode": 1}, 30)  # (its heartbeat)
        served = len(loads[-1].answers)  # and long prompts served by the split
        assert until(lambda: len(loads[-1].answers) >= served + 4, 60)
        for load in loads[1:]:
            load.finish()
        assert until(lambda: "decode-1 drains" in up_log.read_text(), 120), stack.logs()
        assert until(lambda: split() == {"prefill": 0, "decode": 1}, 30)  # one engine again
        loads[0].finish()
    finally:
        for load in loads:
            load.finish()
        stack.stop()
    log = up_log.read_text()
    # each move started the new engines before the old drained
    assert log.index("decode-0 drains") > log.index("decode-1 starting")
    assert log.index("decode-1 drains") > log.index("decode-2 starting")
    cores = {n: s["cpus"] for n, s in stack.services().items() if s["role"] != "gateway"}
    cpus = sorted(os.sched_getaffinity(0))  # 2 or more: two equal shares (an odd one idle)
    both = cpus[: len(cpus) // 2 * 2]
    halves = both[: len(both) // 2], both[len(both) // 2 :]
    assert cores == {
        "decode-0": both,
        "prefill-0": halves[0],
        "decode-1": halves[1],
        "decode-2": both,
    }
    for load in loads:
        assert load.answers and {status for _, status, _ in load.answers} == {200}
        want = hf_greedy(model, load.batch, load.new)
        for i, _, tokens in load.answers:
            assert tokens == want[i]
