"""CURVE keys for a deployment: ``apex-zmq keys DIR`` creates them, ``KeyStore`` reads them.

With ``--keys DIR`` every socket of a role uses ZeroMQ CURVE (encryption and authentication):
sockets a role binds are CURVE servers, sockets it connects are CURVE clients, and a ZAP
authenticator in each binding role admits only the client public keys in ``DIR/authorized/``.

Layout written by ``apex-zmq keys DIR [--clients N]`` (directories 0700, secret files 0600)::

    DIR/
      server.key              server public key: every connecting role needs it
      server.key_secret       server key pair: every binding role (replay server, learner, evaluator)
      client.key              default client public key
      client.key_secret       default client key pair: every connecting role
      authorized/             public keys the binding roles admit, one ``*.key`` file per client
        client.key
        client-1.key ... client-N.key
      clients/client-i/       (--clients N) a key directory for one connecting-only host (actors):
        server.key            copy of the server public key
        client.key            this host's own client pair, named ``client`` so that
        client.key_secret     ``--keys DIR/clients/client-i`` works unchanged

Who needs what: the replay server, learner and evaluator both bind and connect, so they take the
whole ``DIR``. An actor only connects: give its host ``DIR/clients/client-i`` (no server secret, no
other host's key), so that one host can be revoked on its own: delete ``DIR/authorized/client-i.key``
and restart the binding roles (the authorized keys are read when a role starts; connections already
made stay up until then).
"""

from __future__ import annotations

import argparse
import os
import shutil
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

import zmq
import zmq.auth

SERVER = "server"
CLIENT = "client"
AUTHORIZED = "authorized"
CLIENTS = "clients"
_PUBLIC, _SECRET = ".key", ".key_secret"


class KeysError(SystemExit):
    """A key directory that cannot be used; exits the role with a message saying what to do."""


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)


def _pair(directory: Path, name: str) -> tuple[Path, Path]:
    """Create one key pair in ``directory``: public file 0644, secret file 0600."""
    public, secret = zmq.auth.create_certificates(directory, name)
    Path(public).chmod(0o644)
    Path(secret).chmod(0o600)
    return Path(public), Path(secret)


def create(directory: str | Path, clients: int = 0, force: bool = False) -> list[Path]:
    """Create the key pairs of a deployment in ``directory`` (see the module docstring).

    Refuses (SystemExit) when keys already exist there unless ``force``; with ``force`` every key of
    the layout is replaced and the old authorized keys and client directories are removed, since an
    old authorized client key would otherwise keep its access. Returns the files written.
    """
    if clients < 0:
        raise SystemExit(f"--clients: expected a number >= 0, got {clients}")
    if not zmq.has("curve"):
        raise SystemExit("this libzmq was built without CURVE support: cannot create keys")
    root = Path(directory)
    existing = [p for p in (root / f"{n}{s}" for n in (SERVER, CLIENT) for s in (_PUBLIC, _SECRET))
                if p.exists()]
    existing += sorted((root / AUTHORIZED).glob("*.key")) + sorted((root / CLIENTS).glob("*"))
    if existing and not force:
        raise SystemExit(f"apex-zmq keys: {root} already holds keys ({', '.join(map(str, existing[:3]))}"
                         f"{', ...' if len(existing) > 3 else ''}); pass --force to replace every key "
                         "in it (every host then needs the new keys)")
    old_umask = os.umask(0o077)  # nothing is ever group/world-readable, even between create and chmod
    try:
        _private_dir(root)
        for sub in (AUTHORIZED, CLIENTS):
            if force and (root / sub).exists():
                shutil.rmtree(root / sub)
            _private_dir(root / sub)
        written = [*_pair(root, SERVER), *_pair(root, CLIENT)]
        written.append(Path(shutil.copy(root / f"{CLIENT}{_PUBLIC}", root / AUTHORIZED / f"{CLIENT}{_PUBLIC}")))
        for i in range(1, clients + 1):
            name = f"{CLIENT}-{i}"
            host_dir = root / CLIENTS / name
            _private_dir(host_dir)
            written += _pair(host_dir, CLIENT)
            written.append(Path(shutil.copy(root / f"{SERVER}{_PUBLIC}", host_dir / f"{SERVER}{_PUBLIC}")))
            written.append(Path(shutil.copy(host_dir / f"{CLIENT}{_PUBLIC}", root / AUTHORIZED / f"{name}{_PUBLIC}")))
        for p in written:
            if p.name.endswith(_PUBLIC):
                p.chmod(0o644)
    finally:
        os.umask(old_umask)
    return written


def _load(path: Path, secret: bool) -> tuple[bytes, bytes | None]:
    """(public, secret) z85 keys of one certificate file, with errors that say what to do."""
    if not path.is_file():
        raise KeysError(f"--keys: {path} is missing; create the keys with `apex-zmq keys "
                        f"{path.parent}` (layout: python -m pydoc apex_zmq.keys)")
    if secret:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise KeysError(f"--keys: secret key {path} is readable by group or others (mode "
                            f"{mode:04o}, expected 0600); run `chmod 600 {path}`")
    try:
        public, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise KeysError(f"--keys: {path} is not a ZeroMQ certificate: {e}") from None
    if secret and not sec:
        raise KeysError(f"--keys: {path} holds no secret key, expected a *.key_secret file "
                        "written by `apex-zmq keys`")
    return public, sec


@dataclass
class KeyStore:
    """The keys of one role, read from a key directory on first use (a role loads only what it uses)."""

    directory: Path
    _cache: dict[str, tuple[bytes, bytes | None]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.directory = Path(self.directory).expanduser().resolve()
        if not zmq.has("curve"):
            raise KeysError("--keys: this libzmq was built without CURVE support")
        if not self.directory.is_dir():
            raise KeysError(f"--keys: {self.directory} is not a directory; create it with "
                            f"`apex-zmq keys {self.directory}`")

    def _get(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        key = f"{name}{_SECRET if secret else _PUBLIC}"
        if key not in self._cache:
            self._cache[key] = _load(self.directory / key, secret)
        return self._cache[key]

    def server_pair(self) -> tuple[bytes, bytes]:
        """(public, secret) of the server: what a binding role presents."""
        public, secret = self._get(SERVER, True)
        assert secret is not None
        return public, secret

    def server_public(self) -> bytes:
        """The server public key a connecting role checks the server against."""
        return self._get(SERVER, False)[0]

    def client_pair(self) -> tuple[bytes, bytes]:
        """(public, secret) of this host's client key: what a connecting role presents."""
        public, secret = self._get(CLIENT, True)
        assert secret is not None
        return public, secret

    def authorized(self) -> set[bytes]:
        """z85 public keys of the clients a binding role admits (``authorized/*.key``)."""
        folder = self.directory / AUTHORIZED
        if not folder.is_dir():
            raise KeysError(f"--keys: {folder} is missing: a binding role needs the public keys of "
                            f"the clients it admits there (`apex-zmq keys` writes them)")
        keys = {_load(p, False)[0] for p in sorted(folder.glob(f"*{_PUBLIC}"))}
        if not keys:
            raise KeysError(f"--keys: no client keys (*.key) in {folder}: no client could connect")
        return keys


def main(argv: list[str] | None = None) -> int:
    """``apex-zmq keys DIR [--clients N] [--force]``."""
    p = argparse.ArgumentParser(
        prog="apex-zmq keys", description="Create the CURVE keys of a deployment (layout: "
        "python -m pydoc apex_zmq.keys); give every role --keys DIR.")
    p.add_argument("dir", help="directory to create the keys in (created 0700)")
    p.add_argument("--clients", type=int, default=0,
                   help="extra client key pairs client-1..client-N, one per connecting host, each in "
                        "DIR/clients/client-i ready to copy to that host (and revocable on its own)")
    p.add_argument("--force", action="store_true", help="replace the keys already in DIR")
    args = p.parse_args(argv)
    written = create(args.dir, args.clients, args.force)
    root = Path(args.dir)
    print(f"apex-zmq keys: wrote {len(written)} files in {root}\n"
          f"  replay server, learner, evaluator hosts: --keys {root}\n"
          f"  actor hosts: --keys {root} (default client)"
          + (f", or copy {root / CLIENTS}/client-i to host i and pass --keys <that copy>" if args.clients else "")
          + f"\n  revoke a client: delete {root / AUTHORIZED}/<name>.key and restart the binding roles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
