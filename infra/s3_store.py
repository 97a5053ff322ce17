"""S3 backend of the artifact store (AWS, MinIO, Ceph, moto: anything boto3 speaks to).

Endpoint, region and credentials come from the standard AWS_* environment variables
(AWS_ENDPOINT_URL included), read by boto3 itself; nothing here ever logs or formats them.
Objects are written with one PUT, or a multipart upload for large ones: either way S3 makes an
object visible only when it is complete, so readers never see half an artifact.
"""
from __future__ import annotations

import io
import logging
import os
import re
import time
from urllib.parse import urlparse

import boto3
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from boto3.exceptions import S3UploadFailedError
from botocore.exceptions import BotoCoreError, ClientError, ConnectionError as BotoConnectionError, EndpointConnectionError
from botocore.exceptions import NoCredentialsError, ParamValidationError, PartialCredentialsError

from layerquant.errors import LayerquantError
from layerquant.infra.store import ArtifactStore

log = logging.getLogger("layerquant.s3")

MULTIPART_THRESHOLD = 64 << 20
_MISSING = {"NoSuchKey", "404", "NotFound"}
_TRANSIENT_CODES = {"500", "502", "503", "504", "SlowDown", "RequestTimeout", "InternalError", "ServiceUnavailable", "Throttling"}
# answers that will be the same next time: configuration, not weather
_PERMANENT_CODES = {"NoSuchBucket", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403", "InvalidBucketName",
                    "AllAccessDisabled", "AccountProblem", "InvalidToken", "ExpiredToken"}


class StoreUnavailable(LayerquantError):
    """The S3 store cannot be reached or refuses us. Transient (worth a later retry) unless the
    endpoint's answer says otherwise (no such bucket, credentials refused)."""

    def __init__(self, message: str, hint: str = "", transient: bool = True):
        self.transient = transient
        super().__init__(message, hint)


def _error_code(exc: Exception) -> str:
    """The S3 error code of a ClientError, or of the one an S3UploadFailedError wraps."""
    if isinstance(exc, ClientError):
        return exc.response.get("Error", {}).get("Code", "")
    if isinstance(exc, S3UploadFailedError):
        cause = exc.__cause__ or exc.__context__
        if isinstance(cause, ClientError):
            return _error_code(cause)
        match = re.search(r"\(([A-Za-z0-9]+)\)", str(exc))  # "An error occurred (NoSuchBucket) when calling ..."
        return match.group(1) if match else ""
    return ""


def _is_transient(exc: Exception) -> bool:
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError, ParamValidationError)):
        return False
    if isinstance(exc, (BotoConnectionError, EndpointConnectionError)):
        return True
    code = _error_code(exc)
    if code in _PERMANENT_CODES:
        return False
    if isinstance(exc, ClientError):
        return code in _TRANSIENT_CODES
    return isinstance(exc, (BotoCoreError, OSError, S3UploadFailedError))


class S3Store(ArtifactStore):
    def __init__(self, bucket: str, prefix: str = "", attempts: int = 5, backoff_s: float = 0.5,
                 multipart_threshold: int = MULTIPART_THRESHOLD):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold, multipart_chunksize=max(multipart_threshold, 5 << 20))
        # botocore retries each HTTP call; our loop below retries whole operations across
        # longer outages (an endpoint restarting), with exponential backoff
        config = Config(retries={"mode": "standard", "max_attempts": 3}, connect_timeout=5, read_timeout=60)
        self.client = boto3.session.Session().client("s3", config=config)

    @classmethod
    def from_uri(cls, uri: str) -> "S3Store":
        """LAYERQUANT_S3_ATTEMPTS (default 5) bounds the whole-operation retries before a
        task fails and Prefect's own task retries take over."""
        parsed = urlparse(uri)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise LayerquantError(f"{uri!r} is not an S3 location", "use s3://bucket/prefix")
        return cls(parsed.netloc, parsed.path, attempts=int(os.environ.get("LAYERQUANT_S3_ATTEMPTS", "5")))

    def _key(self, path: str) -> str:
        return f"{self.prefix}/{path}" if self.prefix else path

    def describe(self) -> str:
        endpoint = urlparse(self.client.meta.endpoint_url).netloc
        return f"s3://{self.bucket}/{self.prefix} ({endpoint})"

    def _retrying(self, what: str, operation):
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return operation()
            except (ClientError, S3UploadFailedError) as exc:
                # upload_fileobj (multipart) wraps the endpoint's answer in S3UploadFailedError
                code = _error_code(exc)
                if code == "NoSuchBucket":
                    raise StoreUnavailable(f"bucket {self.bucket!r} does not exist at {self.describe()}",
                                           "create it, or point --store / AWS_ENDPOINT_URL at the right place", transient=False) from None
                if code in _PERMANENT_CODES:
                    raise StoreUnavailable(f"{self.describe()} refused our credentials ({code}) for {what}",
                                           "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket policy", transient=False) from None
                if not _is_transient(exc):
                    raise StoreUnavailable(f"S3 {what} failed at {self.describe()}: {code or type(exc).__name__}",
                                           "check the endpoint and the request", transient=False) from None
                if attempt == self.attempts:
                    raise StoreUnavailable(f"S3 {what} failed at {self.describe()} after {attempt} attempts: {code or type(exc).__name__}",
                                           "check the endpoint; re-run to resume, finished artifacts are kept") from None
                reason = code or type(exc).__name__
            except (NoCredentialsError, PartialCredentialsError, ParamValidationError) as exc:
                # configuration, not weather: retrying cannot help
                raise LayerquantError(f"S3 {what} at {self.describe()} cannot start ({type(exc).__name__})",
                                      "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for a non-AWS endpoint)") from None
            except (BotoCoreError, OSError) as exc:
                if attempt == self.attempts:
                    raise StoreUnavailable(f"S3 {what} failed at {self.describe()} after {attempt} attempts ({type(exc).__name__})",
                                           "check that the endpoint is up; re-run to resume, finished artifacts are kept") from None
                reason = type(exc).__name__
            log.warning("S3 %s: transient %s, attempt %d/%d, retrying in %.1fs", what, reason, attempt, self.attempts, delay)
            time.sleep(delay)
            delay *= 2

    def write_bytes(self, path: str, data: bytes) -> None:
        key = self._key(path)
        if len(data) >= self.transfer.multipart_threshold:
            self._retrying(f"multipart upload of {path}", lambda: self.client.upload_fileobj(io.BytesIO(data), self.bucket, key, Config=self.transfer))
        else:
            self._retrying(f"put of {path}", lambda: self.client.put_object(Bucket=self.bucket, Key=key, Body=data))

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """A conditional PUT (If-None-Match: *, AWS S3 since 2024-08, MinIO, moto): the endpoint
        refuses it with 412 when the key exists. An endpoint that ignores the header would let a
        second writer replace the object; reading it back catches most of those races, and a
        lease lost that way costs a duplicate computation of a deterministic artifact, never a
        wrong one."""
        key = self._key(path)

        def put() -> bool:
            try:
                self.client.put_object(Bucket=self.bucket, Key=key, Body=data, IfNoneMatch="*")
            except ClientError as exc:
                # 412: it exists; 409: a concurrent conditional write to the same key won
                if exc.response.get("Error", {}).get("Code", "") in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                    return False
                raise
            return True

        if not self._retrying(f"conditional put of {path}", put):
            return False
        return self.read_bytes(path) == data

    def read_bytes(self, path: str) -> bytes | None:
        def get() -> bytes | None:
            try:
                return self.client.get_object(Bucket=self.bucket, Key=self._key(path))["Body"].read()
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code", "") in _MISSING:
                    return None
                raise

        return self._retrying(f"get of {path}", get)

    def delete(self, path: str) -> None:
        self._retrying(f"delete of {path}", lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(path)))

    def list_paths(self, prefix: str) -> list[str]:
        def listing() -> list[str]:
            paginator = self.client.get_paginator("list_objects_v2")
            strip = len(self.prefix) + 1 if self.prefix else 0
            return sorted(obj["Key"][strip:] for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix))
                          for obj in page.get("Contents", []))

        return self._retrying(f"list of {prefix}", listing)
