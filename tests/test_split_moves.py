"""`baton up --autoscale`: a fixed number of services whose split between the pools follows the
load's mix. Short prompts with long answers keep every service decoding (aggregated); long
prompts with short answers move one to prefill; the short ones again move it back. Every
request is answered, and wherever it ran its greedy tokens equal transformers'."""

import random
import threading
import time

import httpx
from reference import hf_greedy
from stack import Stack
from tiny_models import make_tiny_model

SEED = 20261207
CHAT = (4, 48)  # prompts of a few tokens, answers of 48
LONG = (2600, 2)  # prompts a core takes a few hundred ms for, answers of 2


def prompts(n: int, length: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(3, 49152) for _ in range(length + i)] for i in range(n)]


class Load:
    """`workers` clients, each sending the next of `batch` as soon as its last was answered,
    until `stop` is set: what came back, per prompt."""

    def __init__(self, url: str, batch: list[list[int]], new: int, workers: int):
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

    def until(self, done, timeout_s: float) -> bool:
        """Runs until done() (polled each half second) or the timeout; then stops."""
        deadline = time.monotonic() + timeout_s
        while not (ok := done()) and time.monotonic() < deadline:
            time.sleep(0.5)
        self.stop.set()
        for t in self.threads:
            t.join()
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
    # chat prompt's is a few ms, a long one's a few hundred); no TPOT pressure; every prompt
    # computed (no prefix cache) and every request taken (no admission by SLO)
    config.write_text(
        "[autoscale]\nmax_services = 2\nwindow_s = 3.0\ndown_after_s = 3.0\n"
        "[slo]\nttft_ms = 150\ntpot_ms = 1000\n"
        "[engine]\nenable_prefix_caching = false\n[gateway]\nadmission = 'queue-limit'\n"
    )
    chat, long = prompts(4, CHAT[0], rng), prompts(4, LONG[0], rng)
    stack = Stack(tmp_path / "logs", model, "--config", str(config), prefill=0)
    served = []
    try:

        def split() -> dict[str, int]:
            health = stack.health("gateway")
            return {role: health[role] for role in ("prefill", "decode")}

        assert split() == {"prefill": 0, "decode": 2}  # the configured prefills: none
        phase = Load(stack.url, chat, CHAT[1], workers=2)
        time.sleep(4)  # more than a window of chat
        phase.until(lambda: True, 0)
        assert "drains" not in (tmp_path / "logs-up.log").read_text()  # nothing moved
        served.append((chat, CHAT[1], phase))

        phase = Load(stack.url, long, LONG[1], workers=3)
        moved = phase.until(lambda: split() == {"prefill": 1, "decode": 1}, 120)
        assert moved, stack.logs()
        served.append((long, LONG[1], phase))  # a decode drained while these ran
        phase = Load(stack.url, long, LONG[1], workers=3)  # served by the split
        assert phase.until(lambda: len(phase.answers) >= 6, 60)
        served.append((long, LONG[1], phase))

        phase = Load(stack.url, chat, CHAT[1], workers=2)
        assert phase.until(lambda: split() == {"prefill": 0, "decode": 2}, 120), stack.logs()
        served.append((chat, CHAT[1], phase))
    finally:
        stack.stop()
    up_log = (tmp_path / "logs-up.log").read_text()
    assert "decode-1 drains, a prefill takes its CPUs" in up_log
    assert "prefill-0 drains, a decode takes its CPUs" in up_log
    for batch, new, phase in served:
        assert phase.answers and {status for _, status, _ in phase.answers} == {200}
        want = hf_greedy(model, batch, new)
        for i, _, tokens in phase.answers:
            assert tokens == want[i]
