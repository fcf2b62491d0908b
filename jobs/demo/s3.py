"""S3-compatible object storage on loopback for the demo and the tests: moto's server at a free port."""

from __future__ import annotations

import logging
import socket

# moto accepts any credentials; the demo sets these only where none are set
MOTO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "demo", "AWS_SECRET_ACCESS_KEY": "demo", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    """A free TCP port on 127.0.0.1 (for loopback servers of the demo and the tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_moto():
    """moto's S3 server on 127.0.0.1 at a free port; returns (server, endpoint URL)."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as e:
        raise SystemExit("clipn demo needs moto's S3 server: pip install 'clipn-lake[demo]', "
                         "or pass --endpoint of an S3-compatible server") from e
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    return server, f"http://127.0.0.1:{port}"


def ensure_bucket(endpoint: str, bucket: str) -> None:
    """Create ``bucket`` at ``endpoint`` unless it exists (a MinIO of an earlier demo keeps its bucket)."""
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=endpoint)
    try:
        s3.head_bucket(Bucket=bucket)
    except ClientError:
        s3.create_bucket(Bucket=bucket)
