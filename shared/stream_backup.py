"""JetStream stream snapshots through the server's own API (`$JS.API.STREAM.SNAPSHOT` / `RESTORE`).

nats-py has no snapshot call, so this speaks the API directly, as the NATS CLI does:

- snapshot: ask `$JS.API.STREAM.SNAPSHOT.<stream>` to deliver the stream's store to an inbox;
  the server answers with the stream's config and state, then sends the store as chunks (an
  s2-compressed tar), each with a reply subject we answer to let it send more (flow control),
  and an empty message at the end;
- restore: ask `$JS.API.STREAM.RESTORE.<stream>` with that config and state, send the chunks
  as requests to the subject it names, each answered empty, then an empty request, answered
  with the restored stream's state.

A snapshot is the server's consistent copy of one stream: every message with its sequence,
headers and stored time, so a restored stream replays exactly as the original did (replay
orders streams by stored time; ledger entries name their source sequence). The folder layout
is the NATS CLI's (`backup.json`, `stream.tar.s2`): `nats stream restore <folder>` reads it too.
Consumers are left out: `payments restore` provisions them again (see shared.backup).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client as NatsClient

SNAPSHOT_API = "$JS.API.STREAM.SNAPSHOT.{stream}"
RESTORE_API = "$JS.API.STREAM.RESTORE.{stream}"
METADATA_FILE = "backup.json"
DATA_FILE = "stream.tar.s2"
# The server's default chunk; well under max_payload (1 MB in nats.conf).
CHUNK_BYTES = 128 * 1024
API_TIMEOUT_S = 10.0
# The server sends the next chunk at once; this long without one means it gave up.
CHUNK_TIMEOUT_S = 30.0
# After the last chunk the server rebuilds the stream from the tar before it answers.
RESTORE_FINISH_TIMEOUT_S = 600.0


class StreamBackupError(RuntimeError):
    pass


@dataclass(frozen=True)
class StreamSnapshot:
    name: str
    messages: int
    bytes: int
    first_seq: int
    last_seq: int
    data_bytes: int


def _api_error(document: dict[str, Any]) -> str | None:
    error = document.get("error")
    if not error:
        return None
    return f"{error.get('description', 'error')} (code {error.get('err_code', error.get('code'))})"


async def _api(nc: NatsClient, subject: str, body: dict[str, Any]) -> dict[str, Any]:
    reply = await nc.request(subject, json.dumps(body).encode(), timeout=API_TIMEOUT_S)
    document: dict[str, Any] = json.loads(reply.data)
    problem = _api_error(document)
    if problem:
        raise StreamBackupError(f"{subject}: {problem}")
    return document


async def snapshot_stream(nc: NatsClient, stream: str, folder: Path) -> StreamSnapshot:
    """Write `stream`'s snapshot (without consumers) to `folder`."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    inbox = nc.new_inbox()
    # Subscribed before asking, so no chunk can arrive before anyone listens.
    subscription = await nc.subscribe(inbox)
    received = 0
    try:
        answer = await _api(
            nc,
            SNAPSHOT_API.format(stream=stream),
            {"deliver_subject": inbox, "no_consumers": True, "chunk_size": CHUNK_BYTES},
        )
        with open(folder / DATA_FILE, "wb") as data:
            while True:  # until the empty end-of-snapshot message
                try:
                    message = await subscription.next_msg(timeout=CHUNK_TIMEOUT_S)
                except nats.errors.TimeoutError:
                    raise StreamBackupError(
                        f"{stream}: no snapshot data for {CHUNK_TIMEOUT_S:.0f}s"
                    ) from None
                status = (message.headers or {}).get("Status")
                if status and status.isdigit() and int(status) >= 400:
                    description = (message.headers or {}).get("Description", "")
                    raise StreamBackupError(f"{stream}: snapshot failed: {status} {description}")
                if not message.data:
                    break
                data.write(message.data)
                received += len(message.data)
                if message.reply:
                    await nc.publish(message.reply, b"")
            data.flush()
    finally:
        await subscription.unsubscribe()
    metadata = {"config": answer["config"], "state": answer["state"]}
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    state = answer["state"]
    return StreamSnapshot(
        name=stream,
        messages=int(state.get("messages", 0)),
        bytes=int(state.get("bytes", 0)),
        first_seq=int(state.get("first_seq", 0)),
        last_seq=int(state.get("last_seq", 0)),
        data_bytes=received,
    )


def read_metadata(folder: Path) -> dict[str, Any]:
    document: dict[str, Any] = json.loads((folder / METADATA_FILE).read_text())
    return document


async def restore_stream(nc: NatsClient, folder: Path, replicas: int) -> dict[str, Any]:
    """Create the stream saved in `folder` from its snapshot; its state as the server reports it.

    The stream must not exist. Its replica count is this deployment's (`replicas`), so a backup
    of the one-node embedded stack restores into a three-node cluster as R3.
    """
    metadata = read_metadata(folder)
    config = dict(metadata["config"])
    config["num_replicas"] = replicas
    name = config["name"]
    answer = await _api(
        nc, RESTORE_API.format(stream=name), {"config": config, "state": metadata["state"]}
    )
    deliver = answer["deliver_subject"]
    with open(folder / DATA_FILE, "rb") as data:
        while chunk := data.read(CHUNK_BYTES):
            reply = await nc.request(deliver, chunk, timeout=API_TIMEOUT_S)
            if reply.data:
                problem = _api_error(json.loads(reply.data)) or reply.data.decode()[:300]
                raise StreamBackupError(f"{name}: restore refused a chunk: {problem}")
    final = await nc.request(deliver, b"", timeout=RESTORE_FINISH_TIMEOUT_S)
    document: dict[str, Any] = json.loads(final.data)
    failure = _api_error(document)
    if failure:
        raise StreamBackupError(f"{name}: restore failed: {failure}")
    state: dict[str, Any] = document.get("state", {})
    return state


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()
