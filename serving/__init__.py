"""moa-stack's serving side, one package per concept, layered (tests/test_import_rules.py; docs/ARCHITECTURE.md):
sandbox, routing < models, placement < engines < bench, api < cli; moa/ (the orchestrator) imports none of it."""
