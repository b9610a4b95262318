"""Connecting to a secured Kafka cluster: TLS and SASL settings from the environment.

One place reads, checks and maps them, for both kinds of client this project runs:

* the worker's Faust app: `broker_credentials()` gives `faust.SSLCredentials` / `faust.SASLCredentials`
  (or None for PLAINTEXT) for `faust.App(broker_credentials=...)`;
* plain aiokafka clients (generator, dead-letter replay, the recovery probe of `app/kafka/patches.py`):
  `client_kwargs()` gives `security_protocol`, `ssl_context`, `sasl_mechanism`, `sasl_plain_username`
  and `sasl_plain_password`, the same values Faust hands its own aiokafka clients.

| variable | default | meaning |
|---|---|---|
| `KAFKA_SECURITY_PROTOCOL` | `PLAINTEXT` | `PLAINTEXT`, `SSL`, `SASL_PLAINTEXT` or `SASL_SSL` |
| `KAFKA_SSL_CAFILE` | system CAs | PEM file of the CA(s) that signed the brokers' certificates |
| `KAFKA_SSL_CERTFILE` / `KAFKA_SSL_KEYFILE` | none | client certificate and key (mutual TLS) |
| `KAFKA_SSL_KEY_PASSWORD` | none | password of an encrypted client key |
| `KAFKA_SSL_CHECK_HOSTNAME` | `true` | check the broker's name against its certificate |
| `KAFKA_SASL_MECHANISM` | `PLAIN` | `PLAIN`, `SCRAM-SHA-256` or `SCRAM-SHA-512` |
| `KAFKA_SASL_USERNAME` / `KAFKA_SASL_PASSWORD` | none | SASL credentials |

A bad value stops the process with one line naming every bad value (`configuration error: ...`).
Secrets (the SASL password, the key password) are never logged: `describe()` masks them.

Certificate verification is checked before a client starts when a bootstrap address is given: a
broker whose certificate will never verify (wrong CA, wrong name) is a configuration error reported
as such ("TLS certificate verification failed for host:port: ...; check KAFKA_SSL_CAFILE"), instead
of aiokafka's endless "Unable to bootstrap" retries. A broker that cannot be reached is not an
error here: the clients retry as they always do.
"""
from __future__ import annotations

import functools
import logging
import os
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

log = logging.getLogger(__name__)

PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
# Known to Kafka clients but not configurable from the environment here, and why.
UNSUPPORTED_MECHANISMS = {
    "OAUTHBEARER": "needs a token provider in code (aiokafka's AbstractTokenProvider via "
                   "faust.OAuthCredentials); neither Faust nor aiokafka fetches OAuth tokens itself",
    "GSSAPI": "Kerberos is not supported by this service",
}
MASK = "***"
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


class SecurityConfigError(ValueError):
    """One or more bad security settings; the message lists every one, on one line."""


class TLSVerificationError(ConnectionError):
    """The broker's certificate was refused; permanent until the configuration changes."""


@dataclass(frozen=True)
class Security:
    protocol: str = "PLAINTEXT"
    cafile: str | None = None
    certfile: str | None = None
    keyfile: str | None = None
    key_password: str | None = None
    check_hostname: bool = True
    mechanism: str | None = None
    username: str | None = None
    password: str | None = None

    @property
    def uses_tls(self) -> bool:
        return self.protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    @functools.cached_property
    def ssl_context(self) -> ssl.SSLContext | None:
        """One context for every client of this process (an SSLContext may be shared)."""
        return _context(self) if self.uses_tls else None

    def broker_credentials(self):
        """Faust's own credentials object for `faust.App(broker_credentials=...)`; None = PLAINTEXT."""
        import faust

        if self.uses_sasl:
            return faust.SASLCredentials(username=self.username, password=self.password,
                                         ssl_context=self.ssl_context, mechanism=self.mechanism)
        if self.uses_tls:
            return faust.SSLCredentials(self.ssl_context)
        return None

    def client_kwargs(self) -> dict:
        """Keyword arguments for AIOKafkaProducer / AIOKafkaConsumer / AIOKafkaAdminClient."""
        kw: dict = {"security_protocol": self.protocol}
        if self.uses_tls or self.uses_sasl:
            kw["ssl_context"] = self.ssl_context  # None for SASL_PLAINTEXT, as Faust passes it
        if self.uses_sasl:
            kw.update(sasl_mechanism=self.mechanism, sasl_plain_username=self.username,
                      sasl_plain_password=self.password)
        return kw

    def describe(self) -> dict:
        """The effective settings with the secrets masked: safe to log or print."""
        out: dict = {"KAFKA_SECURITY_PROTOCOL": self.protocol}
        if self.uses_tls:
            out.update(KAFKA_SSL_CAFILE=self.cafile or "(system CAs)", KAFKA_SSL_CERTFILE=self.certfile,
                       KAFKA_SSL_KEYFILE=self.keyfile,
                       KAFKA_SSL_KEY_PASSWORD=MASK if self.key_password else None,
                       KAFKA_SSL_CHECK_HOSTNAME=self.check_hostname)
        if self.uses_sasl:
            out.update(KAFKA_SASL_MECHANISM=self.mechanism, KAFKA_SASL_USERNAME=self.username,
                       KAFKA_SASL_PASSWORD=MASK if self.password else None)
        return {k: v for k, v in out.items() if v is not None}

    def __repr__(self) -> str:  # dataclass's repr would print the secrets
        return f"Security({', '.join(f'{k}={v}' for k, v in self.describe().items())})"

    __str__ = __repr__

    def verify_tls(self, bootstrap: str, timeout: float = 5.0) -> None:
        """Handshake with each bootstrap server; raise TLSVerificationError if its certificate is
        refused. Unreachable or slow servers are skipped: that is not a certificate problem."""
        if not self.uses_tls:
            return
        for host, port in _servers(bootstrap):
            try:
                with socket.create_connection((host, port), timeout=timeout) as sock:
                    with self.ssl_context.wrap_socket(sock, server_hostname=host) as tls:
                        # TLS 1.3: a server that refuses our client certificate says so after
                        # the handshake; a server that accepted it waits for a request.
                        tls.settimeout(0.3)
                        try:
                            tls.recv(1)
                        except (TimeoutError, socket.timeout):
                            pass
            except ssl.SSLCertVerificationError as exc:
                reason = (exc.verify_message or str(exc)).rstrip(".")
                if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
                    hint = "use a broker address the certificate names (or KAFKA_SSL_CHECK_HOSTNAME=false)"
                else:
                    hint = f"check KAFKA_SSL_CAFILE ({self.cafile or 'unset: system CAs'})"
                raise TLSVerificationError(
                    f"TLS certificate verification failed for {host}:{port}: {reason}; {hint}") from None
            except ssl.SSLError as exc:
                raise TLSVerificationError(
                    f"TLS handshake with {host}:{port} failed: {exc.reason or exc}; check that it is a "
                    f"TLS listener (KAFKA_SECURITY_PROTOCOL) and the client certificate "
                    f"(KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE)") from None
            except OSError as exc:
                log.info("TLS pre-check of %s:%s skipped: %s", host, port, exc)


def _servers(bootstrap: str) -> list[tuple[str, int]]:
    """`h1:9092,h2:9093`, or Faust's `kafka://h1:9092;kafka://h2:9093`, to (host, port) pairs."""
    out = []
    for part in bootstrap.replace(";", ",").split(","):
        part = part.strip().split("://", 1)[-1]
        if not part:
            continue
        host, _, port = part.rpartition(":") if ":" in part else (part, "", "9092")
        out.append((host.strip("[]"), int(port)))
    return out


def _context(s: Security) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=s.cafile)
    ctx.check_hostname = s.check_hostname  # the chain is verified either way (CERT_REQUIRED)
    if s.certfile:
        ctx.load_cert_chain(s.certfile, s.keyfile, password=s.key_password)
    return ctx


def _readable(name: str, value: str | None, errors: list[str]) -> str | None:
    if not value:
        return None
    p = Path(value)
    if not p.is_file():
        errors.append(f"{name}={value!r} does not exist")
    elif not os.access(p, os.R_OK):
        errors.append(f"{name}={value!r} is not readable")
    return value


def load(env: Mapping[str, str] | None = None) -> Security:
    """Read and check the KAFKA_* security settings; SecurityConfigError lists every bad value."""
    env = os.environ if env is None else env
    get = lambda name: (env.get(name) or "").strip() or None  # noqa: E731  (empty = unset)
    errors: list[str] = []

    protocol = (get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT").upper()
    if protocol not in PROTOCOLS:
        errors.append(f"KAFKA_SECURITY_PROTOCOL={get('KAFKA_SECURITY_PROTOCOL')!r} is not one of "
                      f"{', '.join(PROTOCOLS)}")
    tls = protocol in ("SSL", "SASL_SSL")
    sasl = protocol in ("SASL_PLAINTEXT", "SASL_SSL")
    known = protocol in PROTOCOLS

    cafile = _readable("KAFKA_SSL_CAFILE", get("KAFKA_SSL_CAFILE"), errors)
    certfile = _readable("KAFKA_SSL_CERTFILE", get("KAFKA_SSL_CERTFILE"), errors)
    keyfile = _readable("KAFKA_SSL_KEYFILE", get("KAFKA_SSL_KEYFILE"), errors)
    key_password = env.get("KAFKA_SSL_KEY_PASSWORD") or None  # a password may have spaces
    if keyfile and not certfile:
        errors.append("KAFKA_SSL_KEYFILE is set without KAFKA_SSL_CERTFILE")
    if key_password and not (certfile or keyfile):
        errors.append("KAFKA_SSL_KEY_PASSWORD is set without KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE")
    raw_check = (get("KAFKA_SSL_CHECK_HOSTNAME") or "true").lower()
    if raw_check not in _TRUE | _FALSE:
        errors.append(f"KAFKA_SSL_CHECK_HOSTNAME={get('KAFKA_SSL_CHECK_HOSTNAME')!r} is not true or false")
    check_hostname = raw_check not in _FALSE

    mechanism = (get("KAFKA_SASL_MECHANISM") or "PLAIN").upper()
    username = get("KAFKA_SASL_USERNAME")
    password = env.get("KAFKA_SASL_PASSWORD") or None
    if mechanism not in MECHANISMS:
        why = UNSUPPORTED_MECHANISMS.get(mechanism, f"not one of {', '.join(MECHANISMS)}")
        errors.append(f"KAFKA_SASL_MECHANISM={get('KAFKA_SASL_MECHANISM')!r}: {why}")
    if sasl:
        missing = [n for n, v in (("KAFKA_SASL_USERNAME", username), ("KAFKA_SASL_PASSWORD", password)) if not v]
        if missing:
            errors.append(f"KAFKA_SECURITY_PROTOCOL={protocol} needs {' and '.join(missing)}")
    if known and not tls:
        # Settings that would be silently ignored are almost always a forgotten protocol.
        stray = [n for n in ("KAFKA_SSL_CAFILE", "KAFKA_SSL_CERTFILE", "KAFKA_SSL_KEYFILE",
                             "KAFKA_SSL_KEY_PASSWORD") if env.get(n)]
        if stray:
            errors.append(f"{', '.join(stray)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use TLS "
                          f"(use SSL or SASL_SSL)")
    if known and not sasl:
        stray = [n for n in ("KAFKA_SASL_MECHANISM", "KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD") if env.get(n)]
        if stray:
            errors.append(f"{', '.join(stray)} set but KAFKA_SECURITY_PROTOCOL={protocol} does not use SASL "
                          f"(use SASL_SSL or SASL_PLAINTEXT)")

    s = Security(protocol=protocol, cafile=cafile, certfile=certfile, keyfile=keyfile,
                 key_password=key_password, check_hostname=check_hostname,
                 mechanism=mechanism if sasl else None, username=username if sasl else None,
                 password=password if sasl else None)
    if not errors and tls:
        try:
            s.ssl_context  # noqa: B018  (loads the CA and the key pair: bad files fail here, at start)
        except ssl.SSLError as exc:
            what = "KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE / KAFKA_SSL_KEY_PASSWORD" if certfile else "KAFKA_SSL_CAFILE"
            errors.append(f"cannot load {what}: {exc.reason or exc}")
        except OSError as exc:
            errors.append(f"cannot read the TLS files: {exc}")
    if errors:
        raise SecurityConfigError("; ".join(errors))
    return s


@functools.lru_cache(maxsize=1)
def current() -> Security:
    """This process's settings, read once; a bad value stops the process with one line."""
    try:
        s = load()
    except SecurityConfigError as exc:
        raise SystemExit(f"configuration error: {exc}") from None
    if s.protocol != "PLAINTEXT":
        log.info("Kafka security: %s", s.describe())
    return s


def _verified(bootstrap: str | None) -> Security:
    s = current()
    if bootstrap:
        try:
            s.verify_tls(bootstrap)
        except TLSVerificationError as exc:
            raise SystemExit(f"configuration error: {exc}") from None
    return s


def broker_credentials(bootstrap: str | None = None):
    """For `faust.App(broker_credentials=...)`; with `bootstrap`, refuses a broker certificate that
    will not verify before the worker starts (one line, not a retry loop)."""
    return _verified(bootstrap).broker_credentials()


def client_kwargs(bootstrap: str | None = None) -> dict:
    """For plain aiokafka clients: `AIOKafkaProducer(bootstrap_servers=b, **client_kwargs(b))`."""
    return _verified(bootstrap).client_kwargs()


def describe() -> dict:
    return current().describe()
