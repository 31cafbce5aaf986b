"""A model's life: declared (registry: models.yaml), fetched (pull), stored (store, adapters), checked (known_answer,
float32_reference, checked_dtype). Imports moa/, serving.routing and serving.placement.machine only; never engines."""
