"""The model replica's token counts of a stream (serving.engine.vllm): counted as vLLM counts its usage, sent
beside the chunks (protocol.Usage) once the prompt is known and final before the last chunk."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from serving.engine.protocol import Usage
from serving.engine.vllm import TokenCounts, _beam_search, _stream_chunks


def output(prompt: int | None, *choices: tuple[int, int], encoder: int | None = None) -> SimpleNamespace:
    """A RequestOutput: `choices` are (index, new token count)."""
    return SimpleNamespace(prompt_token_ids=None if prompt is None else [1] * prompt,
                           encoder_prompt_token_ids=None if encoder is None else [2] * encoder,
                           outputs=[SimpleNamespace(index=i, token_ids=[3] * n) for i, n in choices])


def test_counts_add_up_deltas_per_choice_and_count_each_prompt_once() -> None:
    counts = TokenCounts()
    counts.add("r-0", output(21, (0, 1), (1, 1)), delta=True)  # n=2: one request, both choices
    counts.add("r-0", output(21, (0, 2)), delta=True)
    counts.add("r-1", output(4, (0, 1), encoder=3), delta=True)  # a second prompt of a completions request
    assert counts.usage(final=True) == Usage(21 + 4 + 3, 1 + 1 + 2 + 1, final=True)
    cumulative = TokenCounts()
    cumulative.add("r", output(5, (0, 3)), delta=False)
    cumulative.add("r", output(5, (0, 4)), delta=False)  # CUMULATIVE / FINAL_ONLY outputs hold all tokens
    assert cumulative.usage(final=False) == Usage(5, 4)


def test_only_a_beam_search_request_goes_uncounted() -> None:
    assert _beam_search(b'{"model": "m", "use_beam_search": true, "n": 2}')
    assert not _beam_search(b'{"model": "m", "use_beam_search": false}')
    assert not _beam_search(b'{"model": "m", "messages": [{"role": "user", "content": "use_beam_search"}]}')
    assert not _beam_search(b'["use_beam_search"]') and not _beam_search(b"use_beam_search {")


async def test_counts_travel_once_the_prompt_is_known_and_final_before_the_last_chunk() -> None:
    counts = TokenCounts()
    messages: asyncio.Queue = asyncio.Queue()
    counts.add("r", output(7, (0, 0)), delta=True)
    messages.put_nowait({"type": "http.response.body", "body": b"data: {\"a\": 1}\n\n", "more_body": True})
    items = _stream_chunks(messages, counts)
    assert await anext(items) == Usage(7, 0)  # before the first chunk: a client that leaves now pays the prompt
    assert await anext(items) == 'data: {"a": 1}\n\n'
    counts.add("r", output(7, (0, 2)), delta=True)
    messages.put_nowait({"type": "http.response.body", "body": b"data: {\"b\": 2}\n\n", "more_body": True})
    assert await anext(items) == 'data: {"b": 2}\n\n'  # nothing new about the prompt: no counts in between
    messages.put_nowait({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    assert [item async for item in items] == [Usage(7, 2, final=True), "data: [DONE]\n\n"]


async def test_a_stream_without_counts_carries_only_its_chunks() -> None:
    messages: asyncio.Queue = asyncio.Queue()
    messages.put_nowait({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
    assert [item async for item in _stream_chunks(messages, None)] == ["data: [DONE]\n\n"]
