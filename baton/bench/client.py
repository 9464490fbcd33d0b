"""One streamed /v1/completions request against any OpenAI-compatible server, timed."""

import json
import time

import httpx

from baton.bench.metrics import RequestRecord


async def served_model(client: httpx.AsyncClient) -> str:
    """The name to put in requests: the first model the server lists."""
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


async def complete(
    client: httpx.AsyncClient,
    model: str,
    prompt_ids: list[int],
    rec: RequestRecord,
    t0: float,
    want_ids: bool,
) -> tuple[list[int], str]:
    """Streams one completion, filling `rec` as chunks arrive (a cancelled request keeps
    what it had). Returns the answer's text, and its token ids when `want_ids` and the
    server sends them (a later turn of a session needs the answer).

    The prompt goes as token ids and the length is forced with ignore_eos, so both counts
    are exact on any server that accepts token-id prompts (Baton, vLLM).
    """
    body = {
        "model": model,
        "prompt": prompt_ids,
        "max_tokens": rec.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": want_ids,  # vLLM's extension, served by Baton too
    }
    start = time.perf_counter()
    rec.start_s = start - t0
    last = start
    answer_ids: list[int] = []
    text = ""
    num_chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as r:
            if r.status_code != 200:
                rec.status, rec.error = f"http {r.status_code}", (await r.aread()).decode()[:200]
                return answer_ids, text
            async for line in r.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    rec.status = "ok"
                    break
                chunk = json.loads(data)
                if "error" in chunk:  # a server failing mid-stream says so in an event
                    rec.status, rec.error = "error", str(chunk["error"].get("message"))[:200]
                    return answer_ids, text
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"]["completion_tokens"]
                if choices := chunk.get("choices"):
                    now = time.perf_counter()
                    if rec.ttft_s is None:
                        rec.ttft_s = now - start
                    else:
                        rec.itl_s.append(now - last)
                    last = now
                    num_chunks += 1
                    answer_ids += choices[0].get("token_ids") or []
                    text += choices[0].get("text") or ""
            else:
                rec.status, rec.error = "error", "the stream ended without [DONE]"
    except (httpx.HTTPError, ValueError) as e:  # ValueError: an event that is not JSON
        rec.status, rec.error = "error", f"{type(e).__name__}: {e}"[:200]
    finally:
        rec.e2e_s = last - start if rec.ttft_s is not None else None
        rec.output_tokens = usage_tokens if usage_tokens is not None else num_chunks
    return answer_ids, text
