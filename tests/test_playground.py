"""The playground page in a real browser: Debian's Chromium, driven by Playwright, against the server `moa serve`
builds (create_app) on the real small engines, and on scripted engines for exact failures.

Chromium comes from the system's packages (scripts/test.sh installs `chromium` when missing and it can);
without it these tests skip and say how to get it. Set MOA_PLAYGROUND_SCREENSHOTS=DIR to keep screenshots
(docs/images/ has the ones the README shows).
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest

from moa.pipeline import Pipeline
from moa.steps import Aggregate, Check, Propose
from moa.testing import ScriptedEngine
from moa.transform_steps import Take
from serving.api.app import ServerSettings, create_app
from serving.api.votes import read_votes
from serving.bench.human_votes import judge_votes
from serving.models.registry import load_registry
from tests.conftest import QWEN_SMALL, SMALL, uvicorn_serving

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
# No sandbox (CI runs as root); no background networking: the machines are offline and Chromium would
# otherwise keep trying to reach Google's hosts.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]
SHOTS = os.environ.get("MOA_PLAYGROUND_SCREENSHOTS")
SWAP = {"qwen2.5-coder-1.5b": QWEN_SMALL}
TIMEOUT_MS = 240_000


@pytest.fixture(scope="module")
async def browser():
    try:
        from playwright.async_api import async_playwright
    except ImportError:
        pytest.skip("playwright is not installed: .venv/bin/pip install -e '.[test]'")
    if not os.path.exists(CHROMIUM):
        pytest.skip("no Chromium: install Debian's package (apt-get install chromium); scripts/test.sh does it "
                    "when run as root")
    async with async_playwright() as playwright:
        chromium = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        await chromium.close()


@asynccontextmanager
async def page_on(browser, url: str, *, width: int = 1280, height: int = 900):
    context = await browser.new_context(viewport={"width": width, "height": height})
    page = await context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.set_default_timeout(TIMEOUT_MS)
    await page.goto(f"{url}/")  # the root redirects to /playground
    await page.wait_for_selector("body[data-loaded=true]")
    try:
        yield page
    finally:
        await context.close()
    assert not [c for c in console if c.startswith("pageerror")], console


async def screenshot(page, name: str) -> None:
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SHOTS) / name), full_page=True)


@pytest.fixture(scope="module")
async def real_server(registry, small_pool, tmp_path_factory):
    votes = tmp_path_factory.mktemp("votes") / "votes.jsonl"
    pipelines = {n: registry.pipeline(n).with_models(SWAP) for n in ("moa-lite", "self-moa")}
    app = create_app(registry, models=[QWEN_SMALL, SMALL], pipelines=pipelines, engines=small_pool,
                     settings=ServerSettings(votes_path=votes))
    async with uvicorn_serving(app) as url:
        yield url, votes


@pytest.mark.vllm
async def test_run_view_streams_proposer_columns_then_the_aggregate_with_the_traces_figures(browser, real_server):
    url, _ = real_server
    async with page_on(browser, url) as page:
        assert page.url.endswith("/playground")
        await page.select_option("#run-target", "moa-lite")
        assert "propose" in await page.text_content("#run-steps")  # the pipeline's steps, described
        await page.fill("#run-max-tokens", "48")
        await page.fill("#run-prompt", "Name three primary colours.")
        await page.keyboard.press("Control+Enter")  # the keyboard alone sends
        # While the proposals decode, a proposer column has text and is still running: it streams live.
        await page.wait_for_function("""() => [...document.querySelectorAll('.layer[data-step=propose] .sample')]
            .some(s => s.dataset.status === 'running' && s.querySelector('.text').textContent.length > 0)""")
        await page.wait_for_selector("body[data-run=done]")
        await screenshot(page, "playground-run.png")
        layers = await page.eval_on_selector_all(".layer", "ls => ls.map(l => l.dataset.step)")
        assert layers == ["propose", "aggregate"]
        statuses = await page.eval_on_selector_all(".layer[data-step=propose] .sample",
                                                   "ss => ss.map(s => s.dataset.status)")
        assert statuses == ["ok"] * 3, statuses  # 0.5B n=2 and SmolLM2: three columns, all finished
        answer = await page.text_content("#run-answer")
        aggregate = await page.text_content(".layer[data-step=aggregate] .sample .text")
        assert answer == aggregate  # the aggregator's column is the answer that streamed below
        # Each call's figures on the page are the ones the response's `moa.trace` records for the same request.
        moa = json.loads(await page.text_content("#run-moa"))
        shown = await page.eval_on_selector_all(".call", """cs => cs.map(c => ({call: +c.dataset.call,
            model: c.dataset.model, status: c.dataset.status, prompt: +c.dataset.promptTokens,
            cached: +c.dataset.cachedTokens, completion: +c.dataset.completionTokens, cost: +c.dataset.cost,
            seconds: +c.dataset.seconds}))""")
        trace = moa["trace"]["calls"]
        assert len(shown) == len(trace) == moa["engine_calls"] == 3
        for figures in shown:
            record = trace[figures["call"]]
            assert (figures["model"], figures["status"], figures["prompt"], figures["cached"],
                    figures["completion"]) == (record["model"], record["status"], record["prompt_tokens"],
                                               record["cached_prompt_tokens"], record["completion_tokens"])
            assert figures["seconds"] == pytest.approx(record["end_s"] - record["start_s"], abs=1e-6)
        # Multi-turn: the answer joined the conversation, and the next turn sends both.
        roles = await page.eval_on_selector_all("#conversation li", "ls => ls.map(l => l.dataset.role)")
        assert roles == ["user", "assistant"]


@pytest.mark.vllm
async def test_compare_view_hides_the_names_until_the_vote_which_lands_in_the_jsonl(browser, real_server, small_pool):
    url, votes = real_server
    async with page_on(browser, url, width=390, height=844) as page:  # a phone's width
        await page.click("#tab-compare")
        await page.select_option("#cmp-1", "self-moa")
        await page.select_option("#cmp-2", SMALL)
        await page.fill("#cmp-max-tokens", "32")
        await page.fill("#cmp-prompt", "What is 2 + 2?")
        await page.click("#cmp-send")
        await page.wait_for_selector("body[data-compare=voting]")
        titles = [await page.text_content(f"#pane-{s} h2") for s in "ab"]
        assert titles == ["Assistant A", "Assistant B"]  # no names before the vote
        answers = [await page.text_content(f"#pane-{s} .text") for s in "ab"]
        await screenshot(page, "playground-compare.png")
        await page.keyboard.press("Enter")  # the first vote button has the focus: "A is better"
        await page.wait_for_selector("body[data-compare=voted]")
        revealed = {s: await page.get_attribute(f"#pane-{s}", "data-target") for s in "ab"}
        assert sorted(revealed.values()) == sorted(["self-moa", SMALL])
        assert revealed["a"] in await page.text_content("#pane-a h2")
    (record,) = [json.loads(line) for line in votes.read_text().splitlines()]
    assert record["verdict"] == "a" and record["winner"] == revealed["a"] == record["a"]["target"]
    assert record["a"]["answer"] == answers[0] and record["messages"] == [{"role": "user",
                                                                           "content": "What is 2 + 2?"}]
    # `moa eval --votes` reads the file back and puts a (real) judge's verdict beside the person's.
    (row,) = await judge_votes(small_pool[QWEN_SMALL], read_votes(votes))
    assert row["pair"] == sorted(["self-moa", SMALL]) and row["votes"] == 1 and row["agreement"] in (0.0, 1.0)
    assert row["human_win_rate"] == (1.0 if revealed["a"] == row["pair"][0] else 0.0)


def scripted_server(**settings):
    """A pipeline whose second proposer always fails, on scripted engines: exact failures at exact points."""
    engines = {SMALL: ScriptedEngine(SMALL, delay_s=0.05), QWEN_SMALL: ScriptedEngine(QWEN_SMALL, fail="out of memory")}
    pipeline = Pipeline("p", (Propose(models=(SMALL, QWEN_SMALL)), Aggregate(model=SMALL)), "a failing proposer")
    return create_app(load_registry(), models=[SMALL], pipelines={"p": pipeline}, engines=engines,
                      settings=ServerSettings(**settings))


async def test_a_failed_call_and_the_error_states_render_in_the_page(browser):
    async with uvicorn_serving(scripted_server(api_keys=["secret"], rate_limit_per_minute=1,
                                               rate_limit_burst=1)) as url:
        async with page_on(browser, url) as page:
            page.set_default_timeout(20_000)
            # No key yet: the page says so instead of an empty list.
            assert "401" in await page.text_content("#page-error")
            await page.fill("#api-key", "secret")
            await page.press("#api-key", "Tab")  # a change event: the page lists the models with the key
            await page.wait_for_function("() => document.querySelector('#run-target').options.length > 0")
            await page.fill("#run-prompt", "What is 2 + 2?")
            await page.click("#run-send")
            await page.wait_for_selector("body[data-run=done]")
            failed = await page.eval_on_selector_all(
                ".call[data-status=failed]", "cs => cs.map(c => [c.dataset.model, c.textContent])")
            assert len(failed) == 1 and failed[0][0] == QWEN_SMALL and "out of memory" in failed[0][1]
            assert await page.text_content("#run-answer") == f"{SMALL} answer 0"
            # The second POST beyond the burst of 1 is refused: the 429 shows in the page, the turn is kept.
            await page.fill("#run-prompt", "And 3 + 3?")
            await page.click("#run-send")
            await page.wait_for_selector("body[data-run=failed]")
            error = await page.text_content("#run-error")
            assert "429" in error and "retry" in error
            assert await page.input_value("#run-prompt") == "And 3 + 3?"
            await screenshot(page, "playground-error.png")


async def test_the_page_loads_nothing_from_elsewhere_and_votes_are_off_without_a_path():
    async with uvicorn_serving(scripted_server()) as url, httpx.AsyncClient(base_url=url) as http:
        page = await http.get("/playground")
        assert page.status_code == 200 and "default-src 'self'" in page.headers["content-security-policy"]
        assert "http" not in page.text.replace("http-equiv", "")  # no absolute URL: nothing from a CDN
        for asset in ("app.js", "style.css"):
            assert (await http.get(f"/playground/{asset}")).status_code == 200
        assert (await http.get("/playground/../app.py")).status_code == 404
        vote = {"verdict": "tie", "a": {"id": "chatcmpl-1"}, "b": {"id": "chatcmpl-2"}}
        refused = await http.post("/v1/playground/votes", json=vote)
        assert refused.status_code == 404 and refused.json()["error"]["code"] == "votes_off"


async def test_while_engines_start_the_page_says_so_and_a_send_shows_the_503(browser):
    app = create_app(load_registry(), models=[SMALL], pipelines={}, settings=ServerSettings())

    @asynccontextmanager
    async def engines_still_starting(app):  # no engines: /ready stays 503, as while `moa serve` loads them
        yield

    app.router.lifespan_context = engines_still_starting
    async with uvicorn_serving(app) as url, page_on(browser, url) as page:
        page.set_default_timeout(20_000)
        await page.wait_for_selector("#banner:not([hidden])")
        assert "Not ready" in await page.text_content("#banner")
        await page.fill("#run-prompt", "hello")
        await page.click("#run-send")
        await page.wait_for_selector("body[data-run=failed]")
        assert "503" in await page.text_content("#run-error")


async def test_targets_whose_engines_are_still_starting_are_greyed_until_they_are_up(browser):
    engines = {SMALL: ScriptedEngine(SMALL), QWEN_SMALL: ScriptedEngine(QWEN_SMALL)}
    pipeline = Pipeline("p", (Propose(models=(SMALL,)), Aggregate(model=QWEN_SMALL)))
    app = create_app(load_registry(), models=[SMALL], pipelines={"p": pipeline})
    state = app.state.moa

    @asynccontextmanager
    async def second_engine_starting(app):  # the first engine is up, the second still loading
        state.engines, state.up = engines, [SMALL]
        yield

    app.router.lifespan_context = second_engine_starting
    async with uvicorn_serving(app) as url, page_on(browser, url) as page:
        page.set_default_timeout(20_000)
        await page.wait_for_selector("body[data-loaded=true]")
        option = "#run-target option[value=p]"
        assert await page.eval_on_selector(option, "o => o.disabled") is True
        assert QWEN_SMALL in await page.text_content(option)
        assert await page.eval_on_selector(f"#run-target option[value='{SMALL}']", "o => o.disabled") is False
        assert await page.input_value("#run-target") == SMALL  # the usable target is the one selected
        state.up.append(QWEN_SMALL)
        state.ready = True
        # The page's next /ready poll (every 3 s while not ready) un-greys it.
        await page.wait_for_selector(f"{option}:not([disabled])", state="attached")
        await page.wait_for_selector("#banner[hidden]", state="attached")


async def test_a_check_step_marks_each_sample_with_its_examples_passed(browser):
    """A pipeline with a check step (code execution on): each sample's box says how many of the question's
    examples its code passed, checked in the server's sandbox."""
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    engine = ScriptedEngine(SMALL, reply=lambda messages, params, i: (right, wrong)[i % 2])
    pipeline = Pipeline("checked", (Propose(models=(SMALL,), samples=2, temperature=0.8), Check(), Take(k=1)))
    app = create_app(load_registry(), models=[SMALL], pipelines={"checked": pipeline}, engines={SMALL: engine},
                     settings=ServerSettings(code_execution=True))
    async with uvicorn_serving(app) as url, page_on(browser, url) as page:
        page.set_default_timeout(60_000)
        await page.select_option("#run-target", "checked")
        await page.fill("#run-prompt", "def add(a, b):\n    '''\n    >>> add(2, 3)\n    5\n    '''")
        await page.click("#run-send")
        await page.wait_for_selector("body[data-run=done]")
        marks = await page.eval_on_selector_all(
            ".sample[data-checks]", "ss => ss.map(s => [s.dataset.index, s.dataset.checked, s.dataset.checks])")
        assert sorted(marks) == [["0", "passed", "1/1"], ["1", "failed", "0/1"]]
        assert await page.text_content("#run-answer") == right
