"""Query routers: a sentence embedding of the query, a logistic regression per model (RouteMoA-style scorer).
Imports moa/ only (serving.models.registry reads router files from here).

`moa route fit` writes a router file from `moa eval` results (fit.py); models.yaml names it
under `routers:`; `route` steps ask it which model to try first (scorer.py, moa/routing.py).
"""
