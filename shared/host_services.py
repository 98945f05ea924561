"""The orchestrator host's services that a recording job drives, spoken as JSON over HTTP:

- power (`PAYMENTS_JOB_POWER_PORT`, 9090): `POST /power` wakes the machine;
- runner (`PAYMENTS_JOB_RUNNER_PORT`, 9877): `GET /health`, `POST /scripts/execute`,
  `GET /scripts/<session_id>`;
- recorder (`PAYMENTS_JOB_RECORDER_PORT`, 8889): `GET /`, `POST /recordings/start`,
  `POST /recordings/stop`, `POST /recordings/<file>/upload`.

Every failure is a HostServiceError whose message names the service, the call and what went
wrong, so it can become the job's `error` as it is. Messages never carry a presigned URL (it is
a credential until it expires): the recorder's answers are scrubbed before they are quoted.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

# How much of a service's error answer is quoted in a job's error.
QUOTED_ANSWER_CHARS = 200
# An upload moves the whole recording from the host to S3 before the recorder answers.
UPLOAD_REQUEST_TIMEOUT_S = 900.0
_PRESIGNED_QUERY = re.compile(r"X-Amz-[A-Za-z-]+=[^&\s\"']*")
_URL = re.compile(r"https?://\S+")


class HostServiceError(Exception):
    """A host service could not be reached or refused a call."""


class HostUnreachable(HostServiceError):
    """Nothing answered: connection refused, no route, DNS failure or timeout."""


@dataclass(frozen=True)
class HostPorts:
    power: int
    runner: int
    recorder: int


def scrub(text: str) -> str:
    """The text without URLs or presigned-query parameters, shortened for an error message."""
    text = _PRESIGNED_QUERY.sub("X-Amz-…=<redacted>", text)
    text = _URL.sub("<url>", text)
    return " ".join(text.split())[:QUOTED_ANSWER_CHARS]


def host_literal(host: str) -> str:
    """`host` as it goes into a URL: IPv6 literals in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


class HostServices:
    def __init__(
        self, http: aiohttp.ClientSession, host: str, ports: HostPorts, timeout_s: float
    ) -> None:
        self.http = http
        self.host = host
        self.ports = ports
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)

    def url(self, port: int, path: str) -> str:
        return f"http://{host_literal(self.host)}:{port}{path}"

    async def _call(
        self,
        service: str,
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> tuple[int, Any]:
        where = f"{service} service at {self.host}"
        try:
            async with self.http.request(
                method, url, json=body, timeout=timeout or self.timeout
            ) as answer:
                # A wrong charset must not escape as UnicodeDecodeError: keep what decodes.
                text = await answer.text(errors="replace")
                status = answer.status
        except (aiohttp.ClientConnectionError, TimeoutError) as error:
            raise HostUnreachable(f"{where} unreachable: {type(error).__name__}") from None
        except aiohttp.ClientError as error:
            raise HostServiceError(f"{where} failed: {type(error).__name__}") from None
        try:
            document = json.loads(text) if text else None
        except ValueError:
            document = None
        if document is None and text and status < 300:
            raise HostServiceError(f"{where} answered {status} with a body that is not JSON")
        return status, document if document is not None else text

    async def _ok(
        self,
        service: str,
        method: str,
        url: str,
        body: dict[str, Any] | None = None,
        timeout: aiohttp.ClientTimeout | None = None,
    ) -> Any:
        status, document = await self._call(service, method, url, body, timeout)
        if status >= 300:
            raise HostServiceError(
                f"{service} service at {self.host} answered {status}: {describe(document)}"
            )
        return document

    # -- power ------------------------------------------------------------------------------

    async def wake(self, awake_seconds: int | None) -> None:
        body = {"action": "wake", "reason": "job", "awake_seconds": awake_seconds}
        await self._ok("power", "POST", self.url(self.ports.power, "/power"), body)

    # -- readiness --------------------------------------------------------------------------

    async def runner_ready(self) -> bool:
        return await self._answers("runner", self.url(self.ports.runner, "/health"))

    async def recorder_ready(self) -> bool:
        return await self._answers("recorder", self.url(self.ports.recorder, "/"))

    async def _answers(self, service: str, url: str) -> bool:
        try:
            status, _ = await self._call(service, "GET", url)
        except HostServiceError:
            return False
        return status < 300

    # -- runner -----------------------------------------------------------------------------

    async def execute_script(self, script: dict[str, Any], session_id: str) -> None:
        url = self.url(self.ports.runner, "/scripts/execute")
        await self._ok("runner", "POST", url, {**script, "session_id": session_id})

    async def script_status(self, session_id: str) -> str | None:
        """The script's status (`running`, `completed`, `failed`, ...), None if unknown."""
        url = self.url(self.ports.runner, f"/scripts/{quote(session_id, safe='')}")
        status, document = await self._call("runner", "GET", url)
        if status == 404:
            return None
        if status >= 300:
            raise HostServiceError(
                f"runner service at {self.host} answered {status}: {describe(document)}"
            )
        found = document.get("status") if isinstance(document, dict) else None
        return str(found) if found is not None else "unknown"

    # -- recorder ---------------------------------------------------------------------------

    async def start_recording(self, label: str, streamer_id: str | None) -> str:
        """Start recording; returns the output file name the recorder will upload."""
        body: dict[str, Any] = {"label": label}
        if streamer_id:
            body["streamer_id"] = streamer_id
        url = self.url(self.ports.recorder, "/recordings/start")
        document = await self._ok("recorder", "POST", url, body)
        output = document.get("output") if isinstance(document, dict) else None
        if not isinstance(output, str) or not output.strip():
            raise HostServiceError(f"recorder service at {self.host} named no output file")
        return output.strip()

    async def stop_recording(self) -> None:
        await self._ok("recorder", "POST", self.url(self.ports.recorder, "/recordings/stop"), {})

    async def upload(self, file_name: str, upload_url: str, delete_after: bool) -> str | None:
        """Have the recorder PUT the file to `upload_url`; returns the sha256 it reports."""
        url = self.url(self.ports.recorder, f"/recordings/{quote(file_name, safe='')}/upload")
        document = await self._ok(
            "recorder",
            "POST",
            url,
            {"upload_url": upload_url, "delete_after": delete_after},
            timeout=aiohttp.ClientTimeout(total=UPLOAD_REQUEST_TIMEOUT_S),
        )
        digest = document.get("sha256") if isinstance(document, dict) else None
        return str(digest) if digest else None


def describe(document: Any) -> str:
    """A service's error answer, as a short scrubbed string."""
    if isinstance(document, dict):
        for field in ("detail", "error", "message"):
            if document.get(field):
                return scrub(str(document[field]))
    return scrub(str(document or "no body"))
