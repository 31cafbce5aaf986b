"""The OpenAI-compatible HTTP server (`moa serve`): routes, jobs, delivery, the response cache, the playground.
Imports moa/ and serving's lower layers (models, engines, sandbox); never serving.bench or serving.cli."""
