"""TLS for `serve --tls-cert FILE --tls-key FILE`: the pair checked before the controller starts.

uvicorn would load the pair itself, but its failure is an OpenSSL traceback after the host network
is up ("[SSL] PEM lib (_ssl.c:...)"); here each thing a person can get wrong is named with its file:
a missing or unreadable file, a file that is no PEM certificate or key, a key encrypted with a
passphrase (nobody is there to type it), a key that is not the certificate's, a key file that
every user of the host can read. A certificate that has expired (or is not valid yet) only warns:
the operator may be renewing it, and the controller is still reachable by a client told to trust it.

The key file's mode: refused when any permission is given to "others" (`o+r`, as 0644 is), since
every local user could then impersonate the controller; group read is accepted (0640 root:ssl-cert
is Debian's convention for keys a service reads). The key's bytes are read for the checks and go
nowhere else: no message, log line or exception carries them.
"""

from __future__ import annotations

import datetime
import os
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes, PublicKeyTypes

from browservm.errors import InvalidInput

_FLAGS = {"tls_cert": "--tls-cert", "tls_key": "--tls-key"}
_MAX_PEM = 1 << 20  # a certificate chain or key file is a few KiB: more is not one


class TlsFileError(InvalidInput):
    """A TLS file that cannot serve: which option, which file, why."""

    def __init__(self, field: str, path: Path, reason: str) -> None:
        self.path = path
        super().__init__(field, str(path), reason)

    def __str__(self) -> str:
        return f"{_FLAGS.get(self.field, self.field)} {self.path}: {self.reason}"


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    subject: str
    names: tuple[str, ...]  # the certificate's DNS names and IP addresses (subjectAltName)
    not_after: datetime.datetime
    warnings: tuple[str, ...]  # what the operator should know, yet does not stop serving

    def uvicorn_options(self) -> dict[str, Any]:
        # ssl_ciphers None: OpenSSL's defaults (older uvicorn set "TLSv1", which includes NULL ciphers).
        return {"ssl_certfile": str(self.cert), "ssl_keyfile": str(self.key), "ssl_ciphers": None}

    def summary(self) -> str:
        names = ", ".join(self.names) or "none"
        return f"{self.subject} (names: {names}), valid until {self.not_after:%Y-%m-%d %H:%M} UTC"


def load_server_tls(cert: Path, key: Path, now: datetime.datetime | None = None) -> ServerTls:
    """The pair checked as OpenSSL will load it, or TlsFileError naming the file and the reason."""
    now = now or datetime.datetime.now(datetime.UTC)
    chain = _certificates(cert, _read(cert, "tls_cert"))
    _private_to_us(key)
    private = _private_key(key, _read(key, "tls_key"))
    leaf = chain[0]
    if _public(private.public_key()) != _public(leaf.public_key()):
        raise TlsFileError("tls_key", key, f"is not the key of the certificate {cert} (its public key differs): "
                                           "give the key the certificate was issued for")
    try:
        # What uvicorn will do: OpenSSL's own reading of the pair, with the same errors caught here.
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        raise TlsFileError("tls_cert", cert, f"OpenSSL refuses it with {key}: {exc.reason or exc}") from None
    warnings = []
    if leaf.not_valid_after_utc < now:
        days = (now - leaf.not_valid_after_utc).days
        warnings.append(f"the certificate {cert} expired on {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC "
                        f"({days} day(s) ago): browsers and clients will refuse it until it is renewed")
    elif leaf.not_valid_before_utc > now:
        warnings.append(f"the certificate {cert} is not valid before {leaf.not_valid_before_utc:%Y-%m-%d %H:%M} "
                        "UTC: clients will refuse it until then (is this host's clock right?)")
    return ServerTls(cert, key, leaf.subject.rfc4514_string() or "(no subject)", _names(leaf),
                     leaf.not_valid_after_utc, tuple(warnings))


def _read(path: Path, field: str) -> bytes:
    try:
        # O_NONBLOCK: a FIFO given by mistake is refused below, not waited on.
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as file:
            if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
                raise TlsFileError(field, path, "is not a regular file")
            data = file.read(_MAX_PEM + 1)
    except FileNotFoundError:
        raise TlsFileError(field, path, "does not exist") from None
    except IsADirectoryError:
        raise TlsFileError(field, path, "is a directory, not a file") from None
    except OSError as exc:
        raise TlsFileError(field, path, f"cannot be read: {exc.strerror or exc}") from None
    if len(data) > _MAX_PEM:
        raise TlsFileError(field, path, f"is over {_MAX_PEM} bytes: not a PEM file")
    return data


def _certificates(path: Path, data: bytes) -> list[x509.Certificate]:
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        hint = " (it holds a private key: is it the --tls-key file?)" if b"PRIVATE KEY-----" in data else ""
        raise TlsFileError("tls_cert", path, f"is not a PEM certificate (-----BEGIN CERTIFICATE-----){hint}") from None
    return chain


def _private_to_us(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise TlsFileError("tls_key", path, "does not exist") from None
    except OSError as exc:
        raise TlsFileError("tls_key", path, f"cannot be read: {exc.strerror or exc}") from None
    if mode & stat.S_IRWXO:
        raise TlsFileError("tls_key", path, f"is open to every user of this host (mode {stat.S_IMODE(mode):04o}): "
                                            f"anyone could impersonate the controller with it; `chmod o-rwx {path}` "
                                            "(0600, or 0640 for a group such as ssl-cert)")


def _private_key(path: Path, data: bytes) -> PrivateKeyTypes:
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "it needs a password"
        raise TlsFileError("tls_key", path, "is encrypted with a passphrase, which nobody is there to type when the "
                                            "controller starts: give it decrypted (`openssl pkey -in KEY -out "
                                            "NEW`) and keep it readable by root alone") from None
    except (ValueError, UnsupportedAlgorithm):
        hint = " (it holds a certificate: is it the --tls-cert file?)" if b"CERTIFICATE-----" in data else ""
        raise TlsFileError("tls_key", path, f"is not a PEM private key (-----BEGIN PRIVATE KEY-----){hint}") from None


def _public(key: PublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple([*alt.get_values_for_type(x509.DNSName), *(str(ip) for ip in alt.get_values_for_type(x509.IPAddress))])
