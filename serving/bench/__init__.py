"""Benchmarks and evaluations (`moa bench`, `moa eval`): datasets, measurements, scoring, reports.
Imports moa/ and serving's lower layers (models, placement, engines, sandbox); never serving.api or serving.cli."""
