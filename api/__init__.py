"""The thin HTTP ingress: parse, authenticate, validate, publish or ask a worker, answer.

It never writes the database; it reads projections for queries.
"""
