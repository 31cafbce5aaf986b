"""Playground votes name completions this server produced (issue 25 item 10), on scripted engines over HTTP."""

from __future__ import annotations

import json

import httpx

from moa.pipeline import Pipeline
from moa.steps import Aggregate, Propose
from moa.testing import ScriptedEngine
from serving.api.app import ServerSettings, create_app
from serving.api.errors import APIError
from serving.api.votes import Completions, Produced, VotedCompletion, read_votes
from serving.models.registry import load_registry
from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

Q = [{"role": "user", "content": "What is 2 + 2?"}]


def voting_app(tmp_path, aggregator: ScriptedEngine | None = None, **settings):
    """Two base models and pipeline `p` (SMALL proposes, QWEN_SMALL aggregates), votes into tmp_path."""
    engines = {SMALL: ScriptedEngine(SMALL), QWEN_SMALL: aggregator or ScriptedEngine(QWEN_SMALL)}
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    return create_app(load_registry(), models=[SMALL, QWEN_SMALL], pipelines={"p": pipeline}, engines=engines,
                      settings=ServerSettings(votes_path=tmp_path / "votes.jsonl", **settings))


async def streamed(http: httpx.AsyncClient, body: dict) -> tuple[str, str, list[dict]]:
    """(id, the answer as a client joins it, the chunks) of a streamed chat completion."""
    async with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line[6:] async for line in response.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    answer = ""
    for chunk in chunks:
        if (chunk.get("moa") or {}).get("event") == "answer_restarted":
            answer = ""
        answer += "".join((c.get("delta") or {}).get("content") or "" for c in chunk.get("choices", []))
    return chunks[0]["id"], answer, chunks


async def completed(http: httpx.AsyncClient, body: dict) -> tuple[str, str]:
    response = (await http.post("/v1/chat/completions", json=body)).json()
    return response["id"], response["choices"][0]["message"]["content"]


def vote(a: str, b: str, verdict: str = "a") -> dict:
    return {"a": {"id": a}, "b": {"id": b}, "verdict": verdict}


async def test_a_vote_names_two_completions_and_the_server_records_what_it_sent(tmp_path):
    async with uvicorn_serving(voting_app(tmp_path)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        stream_id, stream_answer, chunks = await streamed(http, {"model": "p", "messages": Q,
                                                            "stream_options": {"include_usage": True}})
        json_id, json_answer = await completed(http, {"model": SMALL, "messages": Q})
        recorded = await http.post("/v1/playground/votes", json=vote(stream_id, json_id))
        assert recorded.status_code == 200, recorded.text
        assert recorded.json() | {"id": None} == {"id": None, "verdict": "a", "winner": "p", "a": "p", "b": SMALL}
        again = await http.post("/v1/playground/votes", json=vote(stream_id, json_id, "b"))
        assert again.status_code == 400 and again.json()["error"]["code"] == "unknown_completion"  # voted once
    (record,) = read_votes(tmp_path / "votes.jsonl")
    assert record["messages"] == Q and record["verdict"] == "a" and record["winner"] == "p"
    assert (record["a"]["target"], record["a"]["answer"], record["a"]["completion"]) == ("p", stream_answer, stream_id)
    assert (record["b"]["target"], record["b"]["answer"], record["b"]["completion"]) == (SMALL, json_answer, json_id)
    (usage,) = [c["usage"] for c in chunks if c.get("usage")]
    assert record["a"]["completion_tokens"] == usage["completion_tokens"] > 0  # the stream's usage chunk
    assert record["b"]["completion_tokens"] == len(json_answer.split()) and record["b"]["seconds"] >= 0


async def test_forged_unknown_and_mismatched_votes_are_refused_and_nothing_is_written(tmp_path):
    async with uvicorn_serving(voting_app(tmp_path)) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        one, _ = await completed(http, {"model": SMALL, "messages": Q})
        two, _ = await completed(http, {"model": QWEN_SMALL, "messages": Q})
        other, _ = await completed(http, {"model": QWEN_SMALL, "messages": [{"role": "user", "content": "Hi"}]})
        forged = {"messages": Q, "verdict": "a", "a": {"target": SMALL, "answer": "I am wrong on purpose"},
                  "b": {"target": QWEN_SMALL, "answer": "4"}}  # what the old API took from the client
        refusals = {
            "forged": (forged, "invalid_value"),
            "unknown": (vote("chatcmpl-made-up", two), "unknown_completion"),
            "same": (vote(one, one), "same_completion"),
            "different prompts": (vote(one, other), "different_prompts"),
            "no such choice": ({**vote(one, two), "b": {"id": two, "index": 1}}, "unknown_completion"),
        }
        for name, (body, code) in refusals.items():
            refused = await http.post("/v1/playground/votes", json=body)
            assert refused.status_code == 400, (name, refused.text)
            assert refused.json()["error"]["code"] == code, (name, refused.json())
        assert (await http.post("/v1/playground/votes", json=vote(one, two, "tie"))).status_code == 200  # still there
    assert len(read_votes(tmp_path / "votes.jsonl")) == 1


async def test_a_stream_records_the_answer_after_a_restart_and_a_broken_off_stream_is_not_votable(tmp_path):
    """The aggregator dies after 2 words: an events stream restarts with the fallback; a plain one ends in error."""
    aggregator = ScriptedEngine(QWEN_SMALL, fail="connection lost", fail_after=2)
    async with (uvicorn_serving(voting_app(tmp_path, aggregator)) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as http):
        restarted, answer, chunks = await streamed(http, {"model": "p", "messages": Q, "moa": {"events": True}})
        assert any((c.get("moa") or {}).get("event") == "answer_restarted" for c in chunks)
        broken, _, chunks = await streamed(http, {"model": "p", "messages": Q})
        assert chunks[-1]["error"]["code"] == "answer_broken_off"
        plain, _ = await completed(http, {"model": SMALL, "messages": Q})
        refused = await http.post("/v1/playground/votes", json=vote(broken, plain))
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "a"
        assert (await http.post("/v1/playground/votes", json=vote(restarted, plain))).status_code == 200
    (record,) = read_votes(tmp_path / "votes.jsonl")
    assert record["a"]["answer"] == answer == f"{SMALL} answer 0"  # the fallback, not the void words before it


async def test_a_cached_reply_is_a_completion_too(tmp_path):
    async with (uvicorn_serving(voting_app(tmp_path, cache_entries=8)) as url,
                httpx.AsyncClient(base_url=url, timeout=30) as http):
        greedy = {"model": SMALL, "messages": Q, "temperature": 0}
        first, _ = await completed(http, greedy)
        response = (await http.post("/v1/chat/completions", json=greedy)).json()
        assert response["moa"]["cached"] is True and response["id"] != first
        assert (await http.post("/v1/playground/votes", json=vote(first, response["id"], "tie"))).status_code == 200


def test_kept_completions_are_bounded_in_size_and_time():
    now = [0.0]
    kept = Completions(max_chars=4000, ttl_s=60, timer=lambda: now[0])
    for n in range(100):
        kept.keep(f"c{n}", Produced(SMALL, Q, {0: "x" * 900}))
    assert len(kept) == 3  # 1,170 characters each (256 for the record): the oldest left as new ones came
    kept.keep("huge", Produced(SMALL, Q, {0: "x" * 10_000}))  # larger than the whole: not kept
    assert "huge" not in kept
    now[0] = 61
    try:
        kept.take(VotedCompletion(id="c98"), VotedCompletion(id="c99"))
    except APIError as exc:
        assert exc.code == "unknown_completion"
    else:
        raise AssertionError("expired completions were still votable")
    assert len(kept) == 0
