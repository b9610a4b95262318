"""Secured clusters: TLS (server and mutual) and SASL from KAFKA_* settings, tested for real.

The embedded broker (Tansu) speaks plaintext here, so every secured listener is put in front of it:
  * TLS: Debian's stunnel (`make stunnel`) terminates TLS with a throwaway CA made by `openssl`, and
    verifies client certificates for mutual TLS;
  * SASL: Tansu 0.6 cannot authenticate anyone (PLAIN is not offered; SCRAM credentials are stored by
    no storage engine this binary has: `tansu user create` is a no-op), so `SaslGateway` below does
    the broker's side of the SASL handshake (PLAIN, SCRAM-SHA-256/512, as RFC 4616 / RFC 5802 and
    Kafka's SaslHandshake/SaslAuthenticate define them) and then relays the connection to Tansu.
The broker advertises the front address (proxy or gateway), so clients never see its plain port.
Every process is stopped by PID and every thread joined, also when a test fails.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import logging
import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError

from app import security
from app.dev.broker import EmbeddedBroker, free_port, port_open
from tests.harness import ROOT, partition_as_producers_do, read_records
from training import cart_sim

KEY_PASSWORD = "key-pass-1"


# -- throwaway PKI (openssl CLI) -----------------------------------------------------------------

def _openssl(*args: str, cwd: Path) -> None:
    assert shutil.which("openssl"), "the openssl CLI is not installed: `make stunnel` installs it (make test does)"
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _leaf(d: Path, name: str, ca: str, cn: str, usage: str, san: str | None, password: str | None) -> None:
    enc = ["-aes-256-cbc", "-pass", f"pass:{password}"] if password else []
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", *enc, "-out", f"{name}.key", cwd=d)
    _openssl("req", "-new", "-key", f"{name}.key", *(["-passin", f"pass:{password}"] if password else []),
             "-subj", f"/CN={cn}", "-out", f"{name}.csr", cwd=d)
    ext = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature", f"extendedKeyUsage={usage}",
           "subjectKeyIdentifier=hash", "authorityKeyIdentifier=keyid,issuer"] + ([f"subjectAltName={san}"] if san else [])
    (d / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=d)


def _ca(d: Path, name: str) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", f"{name}.key", cwd=d)
    _openssl("req", "-x509", "-new", "-key", f"{name}.key", "-subj", f"/CN={name}", "-days", "2",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
             "-out", f"{name}.pem", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")  # a CA that signed nothing we meet: the "wrong CA"
    _leaf(d, "server", "ca", "localhost", "serverAuth", "DNS:localhost,IP:127.0.0.1", None)
    _leaf(d, "client", "ca", "scoring-worker", "clientAuth", None, KEY_PASSWORD)  # encrypted key
    return {name: str(d / name) for name in
            ("ca.pem", "other-ca.pem", "server.pem", "server.key", "client.pem", "client.key")}


# -- the secured front: stunnel (TLS) and/or the SASL gateway, before Tansu ------------------------

class Stunnel:
    def __init__(self, workdir: Path, accept: int, connect: int, pki: dict, verify_clients: bool,
                 host: str = "127.0.0.1") -> None:
        self.accept, self.host, self.log = accept, host, workdir / f"stunnel-{accept}.log"
        self.conf = workdir / f"stunnel-{accept}.conf"
        lines = ["foreground = yes", "pid =", f"output = {self.log}", "debug = notice", "[kafka]",
                 f"accept = {host}:{accept}", f"connect = 127.0.0.1:{connect}",
                 f"cert = {pki['server.pem']}", f"key = {pki['server.key']}"]
        if verify_clients:  # mutual TLS: a client certificate signed by our CA is required
            lines += [f"CAfile = {pki['ca.pem']}", "verifyChain = yes"]
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Stunnel":
        assert shutil.which("stunnel"), "stunnel is not installed: `make stunnel` (make test does)"
        self.proc = subprocess.Popen(["stunnel", str(self.conf)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not port_open(self.accept, self.host):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"stunnel did not start: {self.log.read_text() if self.log.exists() else ''}")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _scram_credential(mechanism: str, password: str, salt: bytes, iterations: int = 4096):
    h = {"SCRAM-SHA-256": "sha256", "SCRAM-SHA-512": "sha512"}[mechanism]
    salted = hashlib.pbkdf2_hmac(h, password.encode(), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", h).digest()
    return h, hashlib.new(h, client_key).digest(), hmac.new(salted, b"Server Key", h).digest()


class SaslGateway:
    """The broker's half of Kafka's SASL (SaslHandshake v0/v1 + SaslAuthenticate v0/v1), then a relay.

    Before authentication only ApiVersions is relayed (as a broker answers it unauthenticated);
    anything else closes the connection. `users` maps user -> password; SCRAM keeps only the salted
    keys, as a broker does. Runs on its own event loop in a thread; `stop()` closes and joins it."""

    MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")

    def __init__(self, port: int, upstream: int, users: dict[str, str]) -> None:
        self.port, self.upstream = port, upstream
        self.salt = os.urandom(16)
        self.users = users
        self.accepted: list[tuple[str, str]] = []  # (mechanism, user)
        self.refused: list[tuple[str, str]] = []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = None

    def start(self) -> "SaslGateway":
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self.loop).result(5)
        return self

    def stop(self) -> None:
        async def close():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self.thread.is_alive():
            if self.server is not None:
                asyncio.run_coroutine_threadsafe(close(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)

    @staticmethod
    async def _frame(reader) -> bytes:
        (size,) = struct.unpack(">i", await reader.readexactly(4))
        return await reader.readexactly(size)

    @staticmethod
    def _send(writer, correlation_id: int, body: bytes) -> None:
        payload = struct.pack(">i", correlation_id) + body
        writer.write(struct.pack(">i", len(payload)) + payload)

    async def _serve(self, reader, writer) -> None:
        up_reader = up_writer = None
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
            mechanism, user = await self._authenticate(reader, writer, up_reader, up_writer)
            if mechanism is None:
                return
            self.accepted.append((mechanism, user))

            async def pipe(src, dst):
                try:
                    while data := await src.read(65536):
                        dst.write(data)
                        await dst.drain()
                finally:
                    dst.close()  # one side ended: end the other
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            for w in (writer, up_writer):
                if w is not None:
                    w.close()

    async def _authenticate(self, reader, writer, up_reader, up_writer):
        mechanism = None
        scram: dict = {}
        while True:
            req = await self._frame(reader)
            api_key, api_version, correlation_id, client_len = struct.unpack(">hhih", req[:10])
            body = req[10 + max(client_len, 0):]
            if api_key == 18:  # ApiVersions: the broker's own answer
                up_writer.write(struct.pack(">i", len(req)) + req)
                resp = await self._frame(up_reader)
                writer.write(struct.pack(">i", len(resp)) + resp)
            elif api_key == 17:  # SaslHandshake
                (n,) = struct.unpack(">h", body[:2])
                mechanism = body[2:2 + n].decode()
                ok = mechanism in self.MECHANISMS
                mechs = b"".join(struct.pack(">h", len(m)) + m.encode() for m in self.MECHANISMS)
                self._send(writer, correlation_id, struct.pack(">hi", 0 if ok else 33, len(self.MECHANISMS)) + mechs)
                if not ok:
                    return None, None
            elif api_key == 36 and mechanism:  # SaslAuthenticate
                (n,) = struct.unpack(">i", body[:4])
                token = body[4:4 + n]
                done, user, reply = self._step(mechanism, token, scram)
                if done and user is None:
                    msg = b"Authentication failed: invalid credentials"
                    self.refused.append((mechanism, scram.get("user")))
                    out = struct.pack(">hh", 58, len(msg)) + msg + struct.pack(">i", 0)
                else:
                    out = struct.pack(">hhi", 0, -1, len(reply)) + reply
                if api_version >= 1:
                    out += struct.pack(">q", 0)  # session_lifetime_ms
                self._send(writer, correlation_id, out)
                await writer.drain()
                if done:
                    return (mechanism, user) if user else (None, None)
            else:  # anything else before authentication: close, as a broker does
                return None, None
            await writer.drain()

    def _step(self, mechanism: str, token: bytes, st: dict) -> tuple[bool, str | None, bytes]:
        """One SASL step: (finished, authenticated user or None, reply bytes)."""
        if mechanism == "PLAIN":  # [authzid] NUL authcid NUL passwd
            parts = token.split(b"\0")
            if len(parts) != 3:
                return True, None, b""
            user, password = parts[1].decode(), parts[2].decode()
            st["user"] = user
            return True, (user if self.users.get(user) == password else None), b""
        h = "sha256" if mechanism == "SCRAM-SHA-256" else "sha512"
        if "server_first" not in st:  # client-first: n,,n=user,r=nonce
            bare = token.decode()[3:]
            attrs = dict(kv.split("=", 1) for kv in bare.split(","))
            st["user"] = attrs["n"].replace("=2C", ",").replace("=3D", "=")
            st["bare"] = bare
            st["nonce"] = attrs["r"] + uuid.uuid4().hex
            st["server_first"] = f"r={st['nonce']},s={base64.b64encode(self.salt).decode()},i=4096"
            return False, None, st["server_first"].encode()
        final = token.decode()  # c=biws,r=nonce,p=proof
        without_proof, _, proof = final.rpartition(",p=")
        password = self.users.get(st["user"])
        if password is None or f"r={st['nonce']}" not in without_proof:
            return True, None, b""
        _, stored_key, server_key = _scram_credential(mechanism, password, self.salt)
        auth_message = f"{st['bare']},{st['server_first']},{without_proof}".encode()
        client_signature = hmac.new(stored_key, auth_message, h).digest()
        client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), client_signature))
        if hashlib.new(h, client_key).digest() != stored_key:
            return True, None, b""
        server_signature = hmac.new(server_key, auth_message, h).digest()
        return True, st["user"], b"v=" + base64.b64encode(server_signature)


class Front:
    """Tansu behind a secured front on `port` (what clients bootstrap from and are told to use)."""

    def __init__(self, broker: EmbeddedBroker, port: int) -> None:
        self.broker, self.port = broker, port
        self.parts: list = []

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://127.0.0.1:{self.port}"


@pytest.fixture
def broker(tmp_path):
    """Overrides conftest's: this broker advertises the front's port (`front`), not its own."""
    front_port = free_port()
    b = EmbeddedBroker(log_path=tmp_path / "broker.log", advertised=f"127.0.0.1:{front_port}").start()
    b.front_port = front_port
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def front(broker, pki, tmp_path):
    """front(tls=..., mtls=..., users=...) puts stunnel and/or the SASL gateway before the broker."""
    made: list[Front] = []

    def make(tls: bool = True, mtls: bool = False, users: dict | None = None) -> Front:
        f = Front(broker, broker.front_port)
        made.append(f)
        target = broker.port
        if users is not None:
            gw_port = free_port() if tls else f.port
            f.gateway = SaslGateway(gw_port, target, users)
            f.parts.append(f.gateway.start())
            target = gw_port
        if tls:
            f.parts.append(Stunnel(tmp_path, f.port, target, pki, verify_clients=mtls).start())
        return f

    try:
        yield make
    finally:
        for f in made:
            for part in reversed(f.parts):
                part.stop()


def tls_env(pki, ca="ca.pem", client_cert=False, **extra) -> dict[str, str]:
    env = {"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": pki[ca]}
    if client_cert:
        env.update(KAFKA_SSL_CERTFILE=pki["client.pem"], KAFKA_SSL_KEYFILE=pki["client.key"],
                   KAFKA_SSL_KEY_PASSWORD=KEY_PASSWORD)
    env.update(extra)
    return env


# -- Kafka I/O through the secured front, with the service's own client settings -------------------

async def _round_trip(bootstrap: str, sec: security.Security, topic: str, n: int = 20) -> list[bytes]:
    kw = sec.client_kwargs()
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=10000, **kw)
    await producer.start()
    try:
        futs = [await producer.send(topic, f"m{i}".encode(), key=b"k") for i in range(n)]
        await asyncio.gather(*futs)
    finally:
        await producer.stop()
    return await _read(bootstrap, sec, topic, lambda rs: len(rs) >= n, 15)


async def _read(bootstrap: str, sec: security.Security, topic: str, until, timeout: float) -> list:
    """Values of `topic` read through the secured connection."""
    records = await read_records(bootstrap, topic, lambda rs: until([r.value for r in rs]), timeout,
                                 **sec.client_kwargs())
    return [r.value for r in records]


async def _refused(bootstrap: str, sec: security.Security) -> str:
    """Start a producer that must be refused; return what aiokafka said."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=3000, **sec.client_kwargs())
    try:
        with pytest.raises(KafkaConnectionError) as exc:
            await producer.start()
    finally:
        await producer.stop()
    return str(exc.value)


def _cli(*args: str, env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env},
                          capture_output=True, text=True, timeout=timeout)


# -- settings: checks and the mapping onto Faust's and aiokafka's objects --------------------------

def test_plaintext_is_the_default_and_changes_nothing():
    s = security.load({})
    assert s.protocol == "PLAINTEXT" and s.broker_credentials() is None
    assert s.client_kwargs() == {"security_protocol": "PLAINTEXT"}


def test_every_bad_value_is_named_in_one_line(tmp_path):
    with pytest.raises(security.SecurityConfigError) as exc:
        security.load({"KAFKA_SECURITY_PROTOCOL": "TLS", "KAFKA_SSL_CAFILE": str(tmp_path / "missing.pem"),
                       "KAFKA_SSL_CHECK_HOSTNAME": "maybe", "KAFKA_SASL_MECHANISM": "OAUTHBEARER"})
    msg = str(exc.value)
    assert "\n" not in msg
    for part in ("KAFKA_SECURITY_PROTOCOL='TLS' is not one of PLAINTEXT, SSL, SASL_PLAINTEXT, SASL_SSL",
                 "missing.pem' does not exist", "KAFKA_SSL_CHECK_HOSTNAME='maybe'", "OAUTHBEARER': needs a token provider"):
        assert part in msg
    with pytest.raises(security.SecurityConfigError, match="SASL_SSL needs KAFKA_SASL_USERNAME and KAFKA_SASL_PASSWORD"):
        security.load({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL"})
    with pytest.raises(security.SecurityConfigError, match="KAFKA_SASL_MECHANISM='GSSAPI'"):
        security.load({"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "GSSAPI",
                       "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"})
    # settings a protocol would silently ignore are a forgotten protocol
    with pytest.raises(security.SecurityConfigError, match="KAFKA_SASL_USERNAME, KAFKA_SASL_PASSWORD set but "
                                                           "KAFKA_SECURITY_PROTOCOL=SSL does not use SASL"):
        security.load({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SASL_USERNAME": "u", "KAFKA_SASL_PASSWORD": "p"})
    with pytest.raises(security.SecurityConfigError, match="KAFKA_SSL_CAFILE set but KAFKA_SECURITY_PROTOCOL=PLAINTEXT"):
        security.load({"KAFKA_SSL_CAFILE": __file__})


def test_a_wrong_key_password_or_a_file_that_is_not_pem_is_a_configuration_error(pki):
    with pytest.raises(security.SecurityConfigError, match="cannot load KAFKA_SSL_CERTFILE / KAFKA_SSL_KEYFILE"):
        security.load(tls_env(pki, client_cert=True, KAFKA_SSL_KEY_PASSWORD="wrong"))
    with pytest.raises(security.SecurityConfigError, match="cannot load KAFKA_SSL_CAFILE"):
        security.load({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CAFILE": __file__})
    with pytest.raises(security.SecurityConfigError, match="KAFKA_SSL_KEYFILE is set without KAFKA_SSL_CERTFILE"):
        security.load({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_KEYFILE": pki["client.key"]})


@pytest.mark.parametrize("protocol,mechanism", [("SASL_SSL", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-512"),
                                                ("SASL_PLAINTEXT", "SCRAM-SHA-256"), ("SSL", None)])
def test_mapping_onto_faust_credentials_and_aiokafka_arguments_agree(pki, protocol, mechanism):
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    env = {"KAFKA_SECURITY_PROTOCOL": protocol}
    if protocol.endswith("SSL"):
        env["KAFKA_SSL_CAFILE"] = pki["ca.pem"]
    if mechanism:
        env.update(KAFKA_SASL_MECHANISM=mechanism.lower(), KAFKA_SASL_USERNAME="svc", KAFKA_SASL_PASSWORD="s3cret pw")
    s = security.load(env)
    creds = s.broker_credentials()
    if mechanism:
        assert isinstance(creds, faust.SASLCredentials)
        assert (creds.protocol.value, creds.mechanism.value, creds.username, creds.password) == \
            (protocol, mechanism, "svc", "s3cret pw")
        assert (creds.ssl_context is s.ssl_context) and ((s.ssl_context is None) == (protocol == "SASL_PLAINTEXT"))
    else:
        assert isinstance(creds, faust.SSLCredentials) and creds.context is s.ssl_context
    # what Faust hands its own aiokafka clients == what ours get
    assert credentials_to_aiokafka_auth(creds) == s.client_kwargs()
    if s.ssl_context is not None:
        import ssl
        assert s.ssl_context.verify_mode == ssl.CERT_REQUIRED and s.ssl_context.check_hostname


def test_secrets_are_masked_wherever_the_settings_are_shown(pki, caplog):
    env = {"KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512", "KAFKA_SSL_CAFILE": pki["ca.pem"],
           "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": "pa55-word", "KAFKA_SSL_CERTFILE": pki["client.pem"],
           "KAFKA_SSL_KEYFILE": pki["client.key"], "KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD}
    s = security.load(env)
    shown = s.describe()
    assert shown["KAFKA_SASL_PASSWORD"] == shown["KAFKA_SSL_KEY_PASSWORD"] == "***"
    assert shown["KAFKA_SASL_USERNAME"] == "svc" and shown["KAFKA_SSL_CAFILE"] == pki["ca.pem"]
    for text in (str(shown), repr(s), str(s), repr(s.broker_credentials())):
        assert "pa55-word" not in text and KEY_PASSWORD not in text
    unchecked = security.load({"KAFKA_SECURITY_PROTOCOL": "SSL", "KAFKA_SSL_CHECK_HOSTNAME": "false"})
    assert unchecked.ssl_context.check_hostname is False


# -- TLS through stunnel, for real -----------------------------------------------------------------

def test_tls_round_trip_with_ca_and_hostname_verification(front, pki):
    f = front(tls=True)
    sec = security.load(tls_env(pki))
    sec.verify_tls(f.bootstrap)  # the pre-check passes too
    assert asyncio.run(_round_trip(f.bootstrap, sec, "tls_topic")) == [f"m{i}".encode() for i in range(20)]


def test_mutual_tls_needs_the_client_certificate(front, pki):
    f = front(tls=True, mtls=True)
    with_cert = security.load(tls_env(pki, client_cert=True))  # encrypted key: KAFKA_SSL_KEY_PASSWORD
    assert len(asyncio.run(_round_trip(f.bootstrap, with_cert, "mtls_topic", 5))) == 5
    without = security.load(tls_env(pki))
    with pytest.raises(security.TLSVerificationError, match=r"TLS handshake with 127\.0\.0\.1:\d+ failed: "
                                                            r".*CERTIFICATE_REQUIRED.*KAFKA_SSL_CERTFILE"):
        without.verify_tls(f.bootstrap)
    asyncio.run(_refused(f.bootstrap, without))


def test_a_wrong_ca_is_refused_with_a_clear_message(front, pki, tmp_path):
    f = front(tls=True)
    wrong = security.load(tls_env(pki, ca="other-ca.pem"))
    # aiokafka alone refuses too, but only says it could not bootstrap (the reason is in a log line)
    assert "Unable to bootstrap" in asyncio.run(_refused(f.bootstrap, wrong))
    with pytest.raises(security.TLSVerificationError) as exc:
        wrong.verify_tls(f.bootstrap)
    assert str(exc.value) == (f"TLS certificate verification failed for {f.bootstrap}: unable to get local issuer "
                              f"certificate; check KAFKA_SSL_CAFILE ({pki['other-ca.pem']})")
    # an address the certificate does not list (it names localhost and 127.0.0.1): the hint says so
    other = Stunnel(tmp_path, free_port(), f.broker.port, pki, verify_clients=False, host="127.0.0.2").start()
    try:
        with pytest.raises(security.TLSVerificationError, match=r"^TLS certificate verification failed for "
                           r"127\.0\.0\.2:\d+: IP address mismatch, certificate is not valid for '127\.0\.0\.2'; "
                           r"use a broker address the certificate names \(or KAFKA_SSL_CHECK_HOSTNAME=false\)$"):
            security.load(tls_env(pki)).verify_tls(f"127.0.0.2:{other.accept}")
    finally:
        other.stop()
    # what an operator sees: the worker and the CLI stop at once, with one line, not a retry loop
    env = {**tls_env(pki, ca="other-ca.pem"), "BROKER_URL": f.url, "DATA_DIR": str(tmp_path / "data"),
           "WEB_PORT": str(free_port())}
    for args in (["-m", "faust", "-A", "app", "worker", "-l", "info"],
                 ["-m", "app.cli", "generate", "--duration", "1", "--broker", f.url]):
        done = _cli(*args, env=env)
        assert done.returncode != 0
        last = done.stderr.strip().splitlines()[-1]
        assert last == f"configuration error: {exc.value}", done.stderr[-2000:]


def test_worker_scores_through_mutual_tls_and_the_cli_generates_and_replays_through_it(front, pki, workers):
    f = front(tls=True, mtls=True)
    env = {**tls_env(pki, client_cert=True), "BROKER_URL": f.url, "PIPELINES": "cart"}
    sec = security.load(env)
    w = workers("w1", env=env)
    # the generator (app/cli.py) over mutual TLS, then one record the worker must dead-letter
    gen = _cli("-m", "app.cli", "generate", "--rate", "100", "--duration", "1.5", "--users", "20", "--broker", f.url,
               env=env)
    assert gen.returncode == 0, gen.stderr[-2000:]

    async def poison():
        p = AIOKafkaProducer(bootstrap_servers=f.bootstrap, **sec.client_kwargs())
        await p.start()
        try:
            await p.send_and_wait("cart_events", b"{not json", key=b"u-poison")
        finally:
            await p.stop()
    asyncio.run(poison())
    inputs = [orjson.loads(v) for v in asyncio.run(_read(f.bootstrap, sec, "cart_events", lambda rs: False, 2))
              if v.startswith(b"{\"")]
    assert len(inputs) >= 100
    want = {e["event_id"] for e in inputs}
    scores = asyncio.run(_read(f.bootstrap, sec, "personalization_scores",
                               lambda rs: {orjson.loads(v)["event_id"] for v in rs} >= want, 40))
    assert {orjson.loads(v)["event_id"] for v in scores} == want
    assert len(asyncio.run(_read(f.bootstrap, sec, "dead_letters", lambda rs: len(rs) >= 1, 20))) == 1
    # the dead-letter replay's clients (app/ops/replay.py) connect over mutual TLS as well
    rep = _cli("-m", "app.cli", "replay-dead-letters", "--dry-run", "--broker", f.url, env=env)
    assert rep.returncode == 0, rep.stderr[-2000:]
    log = w.log()
    assert "Unable connect" not in log and "CERTIFICATE" not in log
    assert "pa55" not in log and KEY_PASSWORD not in log


# -- SASL through the gateway, for real clients ---------------------------------------------------

USERS = {"svc": "pa55-word", "other": "x"}


@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"])
def test_sasl_plaintext_round_trip_and_a_wrong_password_refused(front, mechanism, caplog):
    f = front(tls=False, users=USERS)
    env = {"KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT", "KAFKA_SASL_MECHANISM": mechanism,
           "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": USERS["svc"]}
    assert len(asyncio.run(_round_trip(f.bootstrap, security.load(env), "sasl_topic", 5))) == 5
    assert (mechanism, "svc") in f.gateway.accepted
    caplog.set_level(logging.ERROR, logger="aiokafka")
    asyncio.run(_refused(f.bootstrap, security.load({**env, "KAFKA_SASL_PASSWORD": "wrong"})))
    assert f.gateway.refused and f.gateway.refused[0][0] == mechanism
    assert "SaslAuthenticationFailed" in caplog.text  # what the user sees in the log


def test_worker_scores_through_sasl_ssl_with_scram_sha_512(front, pki, workers):
    f = front(tls=True, users=USERS)
    env = {**tls_env(pki), "KAFKA_SECURITY_PROTOCOL": "SASL_SSL", "KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
           "KAFKA_SASL_USERNAME": "svc", "KAFKA_SASL_PASSWORD": USERS["svc"], "BROKER_URL": f.url, "PIPELINES": "cart"}
    sec = security.load(env)
    w = workers("w1", env=env)
    events = [{k: v for k, v in e.items() if k != "_label"} for e in cart_sim.simulate(5, 1, 3)][:60]

    async def produce():
        p = AIOKafkaProducer(bootstrap_servers=f.bootstrap, **sec.client_kwargs())
        await p.start()
        try:
            await asyncio.gather(*[await p.send("cart_events", orjson.dumps(e), key=e["user_id"].encode(),
                                                partition=partition_as_producers_do(e["user_id"].encode()))
                                   for e in events])
        finally:
            await p.stop()
    asyncio.run(produce())
    want = {e["event_id"] for e in events}
    scores = asyncio.run(_read(f.bootstrap, sec, "personalization_scores",
                               lambda rs: {orjson.loads(v)["event_id"] for v in rs} >= want, 40))
    assert {orjson.loads(v)["event_id"] for v in scores} == want
    assert {m for m, _ in f.gateway.accepted} == {"SCRAM-SHA-512"} and not f.gateway.refused
    assert USERS["svc"] not in w.log()
