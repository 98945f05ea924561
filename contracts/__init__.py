"""Every agreement with the outside world, and nothing else: subjects, streams, schemas and
HTTP models.

No I/O lives here, so the api, the workers, the CLI and the tests can all import it freely.
"""
