"""Throwaway TLS certificates for tests (openssl); no platform import, so the SDK tests can use it too."""

from __future__ import annotations


def make_certificates(directory) -> dict[str, str]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate (openssl).
    Returns paths: ca, server_cert, server_key, client_cert, client_key."""
    import shutil
    import subprocess
    from pathlib import Path

    import pytest

    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed; TLS tests need it to make certificates")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)

    def run(*argv):
        subprocess.run(["openssl", *argv], check=True, capture_output=True, cwd=d)

    run(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=internlm2-test-ca",
    )
    for name, ext in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost"),
        ("client", "extendedKeyUsage=clientAuth"),
    ):
        run(
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            f"/CN=internlm2-test-{name}",
        )
        (d / f"{name}.ext").write_text(ext + "\n")
        run(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.pem",
            "-days",
            "2",
            "-extfile",
            f"{name}.ext",
        )
    return {
        "ca": str(d / "ca.pem"),
        "server_cert": str(d / "server.pem"),
        "server_key": str(d / "server.key"),
        "client_cert": str(d / "client.pem"),
        "client_key": str(d / "client.key"),
    }
