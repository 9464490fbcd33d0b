"""One streamed request against any OpenAI-compatible server, timed: a completion, or a chat
turn that must call a tool."""

import json
import time

import httpx

from baton.bench.metrics import RequestRecord


async def served_model(client: httpx.AsyncClient) -> str:
    """The name to put in requests: the first model the server lists."""
    r = await client.get("/v1/models")
    r.raise_for_status()
    return r.json()["data"][0]["id"]


# the tools workload's: two functions with bounded arguments, so a call ends
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "required": ["city", "days"], "additionalProperties": False,
        "properties": {"city": {"type": "string", "maxLength": 24},
                       "days": {"type": "integer", "minimum": 1, "maximum": 14}}}}},
    {"type": "function", "function": {"name": "search", "parameters": {
        "type": "object", "required": ["query"], "additionalProperties": False,
        "properties": {"query": {"type": "string", "maxLength": 64}}}}},
]  # fmt: skip


def tool_call_body(text: str, max_tokens: int) -> dict:
    """A chat turn whose answer must be a call of one of TOOLS (one call: its length is the
    grammar's, max_tokens only a cap)."""
    return {
        "messages": [{"role": "user", "content": text}],
        "tools": TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "max_tokens": max_tokens,
    }


async def complete(
    client: httpx.AsyncClient,
    model: str,
    prompt_ids: list[int],
    rec: RequestRecord,
    t0: float,
    want_ids: bool,
    tool_text: str | None = None,
    session: str | None = None,
) -> tuple[list[int], str]:
    """Streams one completion, filling `rec` as chunks arrive (a cancelled request keeps
    what it had). Returns the answer's text, and its token ids when `want_ids` and the
    server sends them (a later turn of a session needs the answer).

    The prompt goes as token ids and the length is forced with ignore_eos, so both counts
    are exact on any server that accepts token-id prompts (Baton, vLLM). With `tool_text`
    the request is instead a chat turn of that text that must call a tool (tool_call_body).
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
    path = "/v1/completions"
    if tool_text is not None:
        del body["prompt"], body["ignore_eos"]
        body |= tool_call_body(tool_text, rec.max_tokens)
        path = "/v1/chat/completions"
    start = time.perf_counter()
    rec.start_s = start - t0
    last = start
    answer_ids: list[int] = []
    text = ""
    num_chunks = 0
    usage_tokens = None
    try:
        # a session's turns name it: Baton keeps its KV between them (ignored elsewhere)
        headers = {"x-session-id": session} if session else None
        async with client.stream("POST", path, json=body, headers=headers) as r:
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
