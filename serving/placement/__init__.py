"""Where engines run: this machine's facts (machine), the pure GPU/core plan (devices), a registry's plan (plan),
and the after-the-fact check of it (check). Imports serving.models only (plan.py); never engines, api or cli."""
