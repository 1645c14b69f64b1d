"""The TLS side of a broker connection: the device (or center client) proves who it is with
its certificate, and trusts exactly one broker CA.

Used by the agent and the center helpers with aiomqtt
(``aiomqtt.Client(host, port, tls_context=client_ssl_context(...))``) or paho
(``client.tls_set_context(ctx)``). Why each setting:

- only the pinned CA (``cafile``) is trusted, never the system store: a certificate that any
  public CA signed for the broker's name must not be able to collect the fleet's
  transactions;
- the broker's certificate must name the host the client dials (SAN, IP or DNS), so a stolen
  *device* certificate (clientAuth only, no SAN) cannot be used to impersonate the broker;
- TLS 1.2 is the floor: older versions are broken, and 1.2 is what embedded stacks still
  speak; 1.3 is used whenever both ends have it.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path

from .errors import AgentConfigError, KeyFileError

__all__ = ["client_ssl_context"]


def _readable(path: Path, what: str) -> Path:
    if not path.is_file():
        raise AgentConfigError(f"TLS {what} {path} does not exist: check [mqtt] tls_* in the "
                               "agent config or provision the device again")
    return path


def client_ssl_context(cafile: str | os.PathLike[str], certfile: str | os.PathLike[str],
                       keyfile: str | os.PathLike[str]) -> ssl.SSLContext:
    """A client context: TLS 1.2+, broker verified against ``cafile`` and its SAN, our
    certificate and key presented.

    Refuses (:class:`~edge_agent.errors.KeyFileError`) a key readable by group or others,
    a key that does not belong to the certificate, and (``AgentConfigError``) missing or
    unreadable files, each with a message naming the file.
    """
    ca, cert, key = Path(cafile), Path(certfile), Path(keyfile)
    _readable(ca, "CA file")
    _readable(cert, "certificate")
    _readable(key, "key")
    mode = key.stat().st_mode & 0o777
    if mode & 0o077:
        raise KeyFileError(f"key file {key} is readable by others (mode {mode:04o}): "
                           f"chmod 600 {key}")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and check_hostname
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = True
    try:
        ctx.load_verify_locations(cafile=str(ca))
    except (ssl.SSLError, ValueError) as exc:
        raise AgentConfigError(f"TLS CA file {ca} is not a PEM certificate: {exc}") from None
    try:
        ctx.load_cert_chain(str(cert), str(key))
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc) or "key values mismatch" in str(exc):
            raise KeyFileError(f"key {key} does not belong to certificate {cert}: "
                               "provision the device again") from None
        raise AgentConfigError(f"TLS certificate {cert} or key {key} cannot be loaded: "
                               f"{exc}") from None
    return ctx
