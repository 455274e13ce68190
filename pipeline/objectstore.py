"""Object storage (s3://, gs://) checked before any work: the server answers, it takes the keys, the bucket exists;
each failure one line naming the URI, the cause and the setting to fix, never a key or a secret.

Endpoint and keys come from the standard AWS variables that pyarrow reads (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_REGION; an instance profile on AWS). On a cluster every node needs them: a worker
whose node lacks them fails in one line too (`explain`), naming the node and where the settings go.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

import pyarrow.fs as pafs

REACH_TIMEOUT = 5.0  # seconds for the endpoint to accept a connection
WHERE = "cluster.yaml's docker run_options or the node's profile"


class StoreUnreachable(ConnectionError):
    """The object store does not answer (a machine fault: one line, exit 1)."""


def is_remote(uri: str) -> bool:
    return "://" in str(uri) and not str(uri).startswith("file://")


def endpoint() -> str:
    """The S3 endpoint this process uses: AWS_ENDPOINT_URL(_S3), else AWS's own for the region."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def bucket_info(uri: str, flag: str) -> pafs.FileInfo:
    """The bucket of `uri` as this process sees it (one request, after the endpoint accepts a connection);
    raises the filesystem's own OSError, which `explain` turns into one line."""
    fs, path = pafs.FileSystem.from_uri(uri)
    _check_reachable(uri, flag)
    return fs.get_file_info(path.split("/", 1)[0])


def _check_reachable(uri: str, flag: str) -> None:
    url = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not url or not uri.startswith("s3://"):
        return  # AWS itself: the SDK's own resolution; its errors are explained below
    parsed = urllib.parse.urlparse(url if "://" in url else f"http://{url}")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        with socket.create_connection((parsed.hostname, port), timeout=REACH_TIMEOUT):
            pass
    except OSError as e:
        raise StoreUnreachable(f"{flag} {uri}: no S3 server answers at {url} (AWS_ENDPOINT_URL) within "
                               f"{REACH_TIMEOUT:g} s ({e.strerror or e}); check the endpoint and that the server is up"
                               ) from None


def explain(e: OSError, uri: str, flag: str, node: str | None = None) -> OSError | None:
    """The one-line error for a filesystem error on `uri`, or None if it is not one we know."""
    text = str(e)
    where = f" on node {node}" if node else ""
    settings = (f"; this node needs the S3 settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY): "
                f"put them in {WHERE}") if node else ""
    if any(k in text for k in ("ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                               "INVALID_ACCESS_KEY_ID", "SIGNATURE_DOES_NOT_MATCH")):
        return PermissionError(f"{flag} {uri}: the S3 server{where} refused the credentials; check "
                               f"AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the instance profile){settings}")
    if "NETWORK_CONNECTION" in text or "curlCode" in text or "Could not resolve" in text:
        cause = "cannot resolve the S3 server's host name" if "resolve" in text else "cannot connect to the S3 server"
        return StoreUnreachable(f"{flag} {uri}{where}: {cause} ({endpoint()}); check AWS_ENDPOINT_URL and the "
                                f"network{settings}")
    if "NoSuchBucket" in text or ("Bucket" in text and "not found" in text):
        return FileNotFoundError(f"{flag} {uri}: the bucket does not exist on {endpoint()}; create it or fix the name")
    return None


def check_uri(uri: str, flag: str) -> None:
    """Before any work on `uri`: an object store that answers, takes the keys and holds the bucket. Local
    paths pass through (their own checks name them)."""
    if not is_remote(uri):
        return
    try:
        _, path = pafs.FileSystem.from_uri(uri)
    except (ValueError, OSError) as e:
        raise ValueError(f"{flag} {uri}: not a URI pyarrow can open ({e})") from None
    bucket = path.split("/", 1)[0]
    try:
        info = bucket_info(uri, flag)
    except StoreUnreachable:
        raise
    except OSError as e:
        raise explain(e, uri, flag) or e from None
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{flag} {uri}: the bucket {bucket!r} does not exist on {endpoint()}; create it or "
                                "fix the name")

