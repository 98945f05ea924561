"""Who is calling: admin, viewer and session-reporter tokens, and the client's IP address.

Secure by default: with no admin token configured, admin and viewer routes refuse every call,
unless the operator started the api with PAYMENTS_INSECURE_DEV_MODE=true. Tokens are compared
in constant time. `X-Forwarded-For` is believed only from PAYMENTS_TRUSTED_PROXY_CIDRS.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from functools import cached_property

from aiohttp import web

from api.errors import Unauthorized
from shared.crypto import matches_any, token_matches
from shared.settings import Settings

ADMIN_HEADER = "X-Admin-Token"
SESSION_HEADER = "X-Session-Token"
ORCHESTRATOR_HEADER = "X-Orchestrator-Token"
IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def bearer_token(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return None


@dataclass(frozen=True)
class Auth:
    settings: Settings

    @cached_property
    def admin_token(self) -> str | None:
        token = self.settings.api_admin_token
        return token.get_secret_value() if token and token.get_secret_value() else None

    @cached_property
    def trusted_proxies(self) -> tuple[IpNetwork, ...]:
        return tuple(
            ipaddress.ip_network(c, strict=False) for c in self.settings.trusted_proxy_cidrs
        )

    @cached_property
    def manager_networks(self) -> tuple[IpNetwork, ...]:
        return tuple(
            ipaddress.ip_network(c, strict=False) for c in self.settings.manager_ip_allowlist
        )

    @property
    def open_for_development(self) -> bool:
        return self.settings.insecure_dev_mode and self.admin_token is None

    def require_admin(self, request: web.Request) -> None:
        if self.open_for_development:
            return
        if not token_matches(request.headers.get(ADMIN_HEADER), self.admin_token):
            raise Unauthorized("Admin token required")

    def require_viewer(self, request: web.Request) -> None:
        if self.open_for_development and not self.settings.viewer_tokens:
            return
        presented = request.headers.get(ADMIN_HEADER)
        admin_ok = token_matches(presented, self.admin_token)
        viewer_ok = matches_any(presented, self.settings.viewer_tokens)
        if admin_ok or viewer_ok:
            return
        raise Unauthorized(
            "Viewer token required" if self.settings.viewer_tokens else "Admin token required"
        )

    def require_session_reporter(self, request: web.Request) -> None:
        """Checked when PAYMENTS_SESSION_REPORTER_TOKEN is set, as edges expect (issue 4)."""
        expected = self.settings.session_reporter_token
        if expected is None or not expected.get_secret_value():
            return
        presented = request.headers.get(SESSION_HEADER) or bearer_token(request)
        if not token_matches(presented, expected.get_secret_value()):
            raise Unauthorized("Session reporter token required")

    def client_ip(self, request: web.Request) -> str | None:
        """The socket peer, or the first X-Forwarded-For entry when the peer is a trusted proxy."""
        peer = request.remote
        if peer and self._is_trusted_proxy(peer):
            forwarded = request.headers.get("X-Forwarded-For", "").split(",")[0].strip()
            if forwarded and _valid_ip(forwarded):
                return forwarded
        return peer

    def sees_private_fields(self, request: web.Request) -> bool:
        """Callers outside PAYMENTS_MANAGER_IP_ALLOWLIST get IPs and URLs redacted."""
        if not self.manager_networks:
            return True
        ip = self.client_ip(request)
        return ip is not None and _in_networks(ip, self.manager_networks)

    def _is_trusted_proxy(self, peer: str) -> bool:
        return bool(self.trusted_proxies) and _in_networks(peer, self.trusted_proxies)


def _valid_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


def _in_networks(value: str, networks: tuple[IpNetwork, ...]) -> bool:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    return any(address in network for network in networks)
