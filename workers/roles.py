"""Every worker role, by module name: `faststream run workers.<role>:app`.

The embedded stack starts one copy of each; docker-compose.yml has one service per role.
"""

ROLES: tuple[str, ...] = (
    "registry",
    "ledger",
    "sessions",
    "licensing",
    "audit",
    "jobs",
    "payouts",
    "health_poller",
)
