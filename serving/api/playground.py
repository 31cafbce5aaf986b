"""The playground: a page at /playground to watch a pipeline's agents work, compare two targets, and vote.

The page is three files shipped in the package (serving/api/playground/), plain HTML, CSS and
JavaScript with no build step and nothing fetched from elsewhere (the Content-Security-Policy
forbids it), so it works on an offline machine. It holds no data: everything it shows comes
from /v1 with the API key the user types, under the same key and rate-limit rules as any client.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from serving.api.errors import APIError, documented_errors
from serving.api.state import ServerState
from serving.api.votes import Vote, VoteLog

PAGE_DIR = Path(__file__).parent / "playground"
ASSETS = {"app.js": "text/javascript", "style.css": "text/css"}
# Only this origin: no CDN, no inline script; fetch() to the same server.
HEADERS = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
                                      "frame-ancestors 'none'; form-action 'none'",
           "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def playground_routes(state: ServerState) -> APIRouter:
    router = APIRouter()
    votes = VoteLog(state.settings.votes_path) if state.settings.votes_path else None

    @router.get("/", include_in_schema=False)
    async def root() -> RedirectResponse:
        return RedirectResponse("/playground")

    @router.get("/playground", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(PAGE_DIR / "index.html", media_type="text/html", headers=HEADERS)

    @router.get("/playground/{asset}", include_in_schema=False)
    async def asset(asset: str) -> FileResponse:
        if asset not in ASSETS:
            raise APIError(404, f"no playground file {asset!r}", code="not_found")
        return FileResponse(PAGE_DIR / asset, media_type=ASSETS[asset], headers=HEADERS)

    @router.post("/v1/playground/votes", responses=documented_errors(400, 401, 404, 413, 429))
    async def vote(body: Vote) -> dict:
        """Record a verdict on two chat completions this server produced, named by their `id`s (a JSON line)."""
        if votes is None or state.completions is None:
            raise APIError(404, "this server records no votes: start it with --votes PATH "
                                "(or server.votes_path in models.yaml)", code="votes_off")
        a, b = state.completions.take(body.a, body.b)
        try:
            record = await votes.append(body, a, b)
        except BaseException:
            state.completions.put_back(body.a, body.b, (a, b))  # not recorded: they may be voted on again
            raise
        return {"id": record["id"], "verdict": record["verdict"], "winner": record["winner"],
                "a": a.target, "b": b.target}

    return router
