"""S3 presigned URLs with aiobotocore; region, endpoint URL and addressing style make
S3-compatible stores (MinIO, moto) work. Presigning is local: no request reaches S3. The one
request made is `object_size`, which recording jobs use to confirm an upload landed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

log = logging.getLogger(__name__)


class BadS3Uri(ValueError):
    pass


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str

    @property
    def uri(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/key` (leading slashes in the key are dropped); anything else is refused."""
    text = uri.strip()
    if not text.startswith("s3://"):
        raise BadS3Uri("Expected s3:// URI")
    bucket, _, key = text[len("s3://") :].partition("/")
    key = key.lstrip("/")
    if not bucket or not key or any(ch.isspace() for ch in bucket):
        raise BadS3Uri("Expected s3://<bucket>/<key>")
    return S3Location(bucket, key)


class Presigner:
    """One S3 client for the life of a worker."""

    def __init__(self, region: str | None, endpoint_url: str | None, addressing_style: str) -> None:
        self.region = region
        self.endpoint_url = endpoint_url
        self.addressing_style = addressing_style
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._starting = asyncio.Lock()

    async def start(self) -> None:
        session = get_session()
        config = AioConfig(signature_version="s3v4", s3={"addressing_style": self.addressing_style})
        self._client = await self._stack.enter_async_context(
            session.create_client(
                "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config
            )
        )

    async def ensure_started(self) -> None:
        """Create the client on first use: it costs ~15 MB that a process never presigning
        (an api nobody asks for recordings) keeps."""
        async with self._starting:
            if self._client is None:
                await self.start()

    async def close(self) -> None:
        await self._stack.aclose()

    async def presign(self, method: str, location: S3Location, expires_s: int) -> str:
        operation = {"GET": "get_object", "PUT": "put_object"}[method]
        url: str = await self._client.generate_presigned_url(
            operation,
            Params={"Bucket": location.bucket, "Key": location.key},
            ExpiresIn=expires_s,
        )
        return url

    async def object_size(self, location: S3Location) -> int | None:
        """The object's size in bytes, or None when it does not exist; other errors raise."""
        try:
            head = await self._client.head_object(Bucket=location.bucket, Key=location.key)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(head["ContentLength"])

    async def presign_get_or_none(self, uri: str | None, expires_s: int) -> str | None:
        """A fresh GET URL, or None when there is no URI, no credentials or any failure."""
        if not uri or self._client is None:
            return None
        try:
            return await self.presign("GET", parse_s3_uri(uri), expires_s)
        except Exception as error:
            log.warning("presign failed", extra={"error": type(error).__name__})
            return None
