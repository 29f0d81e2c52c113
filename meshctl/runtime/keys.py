"""CurveZMQ keys: make, store, load; and the authenticator that admits only plan keys.

Keys are Z85 text. A key pair on disk is two files, `NAME.key` (public) and
`NAME.key_secret` (secret, mode 0600), in the zmq certificate format so that
`zmq.auth.load_certificate` reads them. The coordinator's authenticator admits a
client only if its public key is one the run lists for that ZAP domain
(`mesh` for daemons, `events` for observers); the Curve-authenticated User-Id
(the client's Z85 public key) is how the coordinator knows who sent a message.
"""

from __future__ import annotations

import hashlib
import os
import queue
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from meshctl.errors import UserError

MESH_ZAP_DOMAIN = "mesh"
EVENTS_ZAP_DOMAIN = "events"


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    """Z85, 40 bytes."""
    secret: bytes

    @classmethod
    def generate(cls) -> KeyPair:
        public, secret = zmq.curve_keypair()
        return cls(public, secret)

    def save(self, directory: Path, name: str) -> Path:
        """Write NAME.key and NAME.key_secret (0600); return the secret file's path."""
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{name}.key").write_text(_cert(self.public, None))
        secret = directory / f"{name}.key_secret"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(_cert(self.public, self.secret))
        return secret

    @classmethod
    def load(cls, path: str | Path) -> KeyPair:
        """Read a secret key file; a missing or malformed one is a UserError."""
        try:
            public, secret = zmq.auth.load_certificate(str(path))
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read key file: {err}", where=str(path)) from None
        if not public or not secret or len(public) != 40 or len(secret) != 40:
            raise UserError("not a Curve secret key file (need public-key and secret-key)",
                            where=str(path))
        return cls(public, secret)


def check_public_key(key: str | bytes, *, where: str) -> bytes:
    """A Z85 Curve public key as bytes, or a UserError saying what is wrong."""
    raw = key.encode() if isinstance(key, str) else key
    try:
        if len(raw) != 40:
            raise ValueError(f"{len(raw)} characters, need 40")
        zmq.utils.z85.decode(raw)
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"bad Curve public key: {err}", where=where) from None
    return raw


KEYS_DIR = Path(".meshctl") / "keys"
"""Where `meshctl keys generate` keeps key pairs, relative to the mesh.yaml's directory."""
COORDINATOR_KEY = "coordinator"
"""Name of the coordinator's key pair: `.meshctl/keys/coordinator.key_secret` on the coordinator host."""
_KEY_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


def keys_dir(mesh_file: str | Path) -> Path:
    """`.meshctl/keys/` beside mesh.yaml."""
    return Path(mesh_file).resolve().parent / KEYS_DIR


def paste_line(public: bytes | str) -> str:
    """The mesh.yaml line that declares a public key."""
    return f'public_key: "{public.decode() if isinstance(public, bytes) else public}"'


def generate_key(name: str, directory: Path, *, force: bool = False) -> tuple[KeyPair, Path]:
    """`meshctl keys generate`: a new pair as NAME.key and NAME.key_secret (0600) in `directory`.

    An existing pair is refused unless `force` (a rotation: the new public key must then
    replace the old one in mesh.yaml). A `.meshctl/keys` directory gets a `.gitignore` of `*`
    so a secret can never be committed with the mesh.
    """
    if not _KEY_NAME.match(name):
        raise UserError(f"key name {name!r} is not a plain file name",
                        hint="use letters, digits, '-', '_' and '.', e.g. the domain's name or `coordinator`")
    secret, public = directory / f"{name}.key_secret", directory / f"{name}.key"
    if not force and (secret.exists() or public.exists()):
        raise UserError(f"key {name} exists already", where=str(secret if secret.exists() else public),
                        hint=f"`meshctl keys show {name}` prints its public key; --force replaces it "
                             "(then the new public_key must replace the old one in mesh.yaml)")
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    if directory.parent.name == ".meshctl" and directory.name == "keys":
        ignore = directory / ".gitignore"
        if not ignore.exists():
            ignore.write_text("# secret keys never go into git\n*\n")
    for f in (secret, public):  # a replaced file keeps its mode; start afresh so the secret is 0600
        if f.is_symlink() or f.exists():
            f.unlink()
    pair = KeyPair.generate()
    return pair, pair.save(directory, name)


def read_public(name: str, directory: Path) -> tuple[bytes, Path]:
    """The public key of key pair NAME in `directory` (from NAME.key, else NAME.key_secret)."""
    for f in (directory / f"{name}.key", directory / f"{name}.key_secret"):
        if f.is_file():
            try:
                public, _ = zmq.auth.load_certificate(str(f))
            except (OSError, ValueError) as err:
                raise UserError(f"cannot read key file: {err}", where=str(f)) from None
            if public is None or len(public) != 40:
                raise UserError("not a Curve key file (no public-key)", where=str(f))
            return public, f
    raise UserError(f"no key {name} in {directory}", where=str(directory / f"{name}.key"),
                    hint=f"make one with `meshctl keys generate {name}`")


def declared_coordinator_keys(declared: str, mesh_file: str | Path,
                              explicit: Path | None = None) -> tuple[Path, KeyPair]:
    """The coordinator's key pair for a mesh that declares `mesh.coordinator.public_key`.

    The secret is `explicit` (`--coordinator-key FILE`) or `.meshctl/keys/coordinator.key_secret`
    beside mesh.yaml. Missing, readable by others, unreadable, or not the declared key: a
    UserError that says which and how to fix it.
    """
    path = (explicit or keys_dir(mesh_file) / f"{COORDINATOR_KEY}.key_secret").resolve()
    want = fingerprint(declared)
    if not path.is_file():
        raise UserError(f"mesh.coordinator.public_key ({want}) is declared but its secret key is not on this host",
                        where=str(path), hint="copy the coordinator's secret key here or pass --coordinator-key "
                        "FILE; a new mesh makes one with `meshctl keys generate coordinator`")
    mode = path.stat().st_mode & 0o777
    if mode & 0o077:
        raise UserError(f"the coordinator's secret key is readable by others (mode {mode:04o})", where=str(path),
                        hint=f"chmod 600 {path}")
    pair = KeyPair.load(path)
    if pair.public.decode() != declared:
        raise UserError(f"secret key {fingerprint(pair.public)} is not the coordinator key mesh.yaml declares "
                        f"({want})", where=str(path),
                        hint="use the secret of the declared key (--coordinator-key FILE), or change "
                             "mesh.coordinator.public_key in a reviewed pull request")
    return path, pair


def coordinator_server_key(declared: str, given: str | None) -> bytes:
    """The coordinator key a daemon trusts: `given` (--server-key), else the plan's declared one.

    Both, and different: refused (the plan, reviewed in git, is the source of identity)."""
    if given is None:
        if not declared:
            raise UserError("the plan declares no coordinator key (mesh.coordinator.public_key), so --server-key "
                            "is needed", where="--server-key", hint="the coordinator's run.json has it as "
                            "coordinator_public; or declare the coordinator's key in mesh.yaml")
        return check_public_key(declared, where="mesh.coordinator.public_key")
    key = check_public_key(given, where="--server-key")
    if declared and key.decode() != declared:
        raise UserError(f"--server-key {fingerprint(key)} is not the coordinator key the plan declares "
                        f"({fingerprint(declared)})", where="--server-key",
                        hint="leave --server-key out to use the plan's key")
    return key


def _cert(public: bytes, secret: bytes | None) -> str:
    lines = ["#   meshctl CurveZMQ certificate", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return "\n".join(lines) + "\n"


REFUSAL_LOG_S = 60.0
"""A refused key is logged at most this often per address (a client retries its handshake)."""


def fingerprint(key: str | bytes) -> str:
    """A short name for a Z85 public key in logs: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()[:8]


class _AllowList:
    """ZAP credentials provider: a fixed set of Z85 public keys per ZAP domain; logs each refusal."""

    def __init__(self, allowed: dict[str, set[bytes]]):
        self.allowed = allowed
        self.address = ""
        """Peer address of the ZAP request being decided (the authenticator sets it)."""
        self.refusals: queue.SimpleQueue[str] = queue.SimpleQueue()
        """One line per logged refusal, for the coordinator to turn into events."""
        self.logged: dict[tuple[str, str], float] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.allowed.get(domain, set()):
            return True
        fp, address, now = fingerprint(key), self.address or "an unknown address", time.monotonic()
        if now - self.logged.get((fp, address), -REFUSAL_LOG_S) >= REFUSAL_LOG_S:
            if len(self.logged) >= 4096:  # many keys: start over rather than grow
                self.logged.clear()
            self.logged[(fp, address)] = now
            line = f"refused Curve handshake: key {fp} from {address} is not a {domain} key of this run"
            print(line, file=sys.stderr, flush=True)
            self.refusals.put(line)
        return False


class _Authenticator(ThreadAuthenticator):
    """A ThreadAuthenticator that tells its allow-list the address of the request it decides."""

    provider: _AllowList

    def handle_zap_message(self, msg: list[bytes]):  # type: ignore[override]  # sync or async per pyzmq
        if len(msg) >= 4:
            self.provider.address = msg[3].decode("utf-8", "replace")
        return super().handle_zap_message(msg)


def start_authenticator(ctx: zmq.Context, allowed: dict[str, set[bytes]]) -> ThreadAuthenticator:
    """Start a ZAP handler admitting exactly `allowed[zap_domain]` keys.

    Refused keys are logged to stderr by fingerprint and address, and queued on the
    returned authenticator's `refusals`.
    """
    auth = _Authenticator(ctx)
    auth.provider = _AllowList(allowed)
    auth.refusals = auth.provider.refusals
    auth.start()
    for zap_domain in allowed:
        auth.configure_curve_callback(domain=zap_domain, credentials_provider=auth.provider)
    return auth


def curve_server(sock: zmq.Socket, keys: KeyPair, zap_domain: str) -> None:
    """Make `sock` a Curve server; call before bind."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_server = True
    sock.zap_domain = zap_domain.encode()


def curve_client(sock: zmq.Socket, keys: KeyPair, server_public: bytes) -> None:
    """Make `sock` a Curve client of `server_public`; call before connect."""
    sock.curve_secretkey = keys.secret
    sock.curve_publickey = keys.public
    sock.curve_serverkey = server_public


def fast_reconnect(sock: zmq.Socket) -> None:
    """Retry a refused connection every 10 ms (ZeroMQ's default is 100 ms); call before connect.

    For sockets that connect to a coordinator that is starting on this host (forked
    daemons, `up`'s own observer): they usually connect before it has bound, and a
    100 ms wait (or a backoff) would be the largest part of a local mesh's start.
    """
    sock.reconnect_ivl = 10
