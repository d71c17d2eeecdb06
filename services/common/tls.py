"""Server credentials: TLS with a certificate chain, and mTLS when a client CA is given."""

from __future__ import annotations

from pathlib import Path

import grpc


def server_credentials(cert_file: str, key_file: str, client_ca_file: str | None = None) -> grpc.ServerCredentials:
    """PEM files -> credentials. With ``client_ca_file`` every client must present a certificate
    signed by that CA (mTLS); without it, any client may connect over TLS."""
    cert = Path(cert_file).read_bytes()
    key = Path(key_file).read_bytes()
    client_ca = Path(client_ca_file).read_bytes() if client_ca_file else None
    return grpc.ssl_server_credentials(
        ((key, cert),), root_certificates=client_ca, require_client_auth=client_ca is not None
    )
