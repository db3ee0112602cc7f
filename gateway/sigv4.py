"""Re-signing requests for an AWS upstream (`auth: aws_sigv4`) with botocore's SigV4 signer.

A caller's SigV4 signature covers the gateway's Host, so AWS would reject it as forwarded.
Credentials and region come from the usual AWS environment (botocore's provider chain),
resolved once at start; each attempt is signed afresh (SigV4 signatures carry a timestamp).
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from botocore.session import get_session

from gateway.config import GatewayConfig

_SIGNATURE_HEADERS = frozenset({"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"})


class RequestSigner:
    def __init__(self, credentials: Credentials, regions: dict[str, str], service: str = "lambda") -> None:
        self._credentials = credentials
        self._regions = regions
        self._service = service

    def sign(self, method: str, url: str, headers: list[tuple[str, str]], body: bytes) -> list[tuple[str, str]]:
        """The headers with the caller's signature replaced by the gateway's own."""
        kept = [(k, v) for k, v in headers if k.lower() not in _SIGNATURE_HEADERS and k.lower() != "host"]
        host = host_header(url)
        request = AWSRequest(method=method, url=url, data=body, headers={"Host": host})
        region = self._regions.get(urlsplit(url).netloc, "us-east-1")
        SigV4Auth(self._credentials.get_frozen_credentials(), self._service, region).add_auth(request)
        signed = [(k, v) for k, v in request.headers.items() if k.lower() in _SIGNATURE_HEADERS]
        return [*kept, ("Host", host), *signed]


def host_header(url: str) -> str:
    """The Host to sign and send: without a default port, as HTTP clients send it ("h:80" -> "h")."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    default = {"http": ":80", "https": ":443"}.get(parts.scheme, "")
    return netloc[: -len(default)] if default and netloc.endswith(default) else netloc


def signer_if_needed(config: GatewayConfig) -> RequestSigner | None:
    regions = {
        urlsplit(u.url).netloc: u.aws_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
        for u in config.upstreams.values()
        if u.auth == "aws_sigv4"
    }
    if not regions:
        return None
    credentials = get_session().get_credentials()
    if credentials is None:
        raise RuntimeError("auth: aws_sigv4 needs AWS credentials in the environment")
    return RequestSigner(credentials, regions)
