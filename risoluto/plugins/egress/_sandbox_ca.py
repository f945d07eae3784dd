"""A per-sandbox certificate authority that lives only in the proxy's memory.

Made at launch (EC P-256), valid from a few minutes before now until the sandbox's timeout
(at most 24 h). Its certificate goes into the worker's trust store; its private key never
leaves this object: not to disk, not to the container. Leaf certificates for the
credentialed names the worker connects to are made on first use and cached per name, as
ready ``ssl.SSLContext`` objects. Python's ``ssl`` loads a key only from a file, so a leaf's
key and chain are handed to it through an anonymous in-memory file (``memfd_create``),
closed at once.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

MAX_LIFE_S = 24 * 3600
MAX_LEAVES = 256  # cached leaf contexts per sandbox (names under a wildcard entry are many)
SKEW = datetime.timedelta(minutes=5)  # a worker clock slightly behind still accepts the leaves


class SandboxCA:
    def __init__(self, sandbox: str, life_s: float):
        now = datetime.datetime.now(datetime.timezone.utc)
        self.not_after = now + datetime.timedelta(seconds=min(max(life_s, 60.0), MAX_LIFE_S))
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())  # one key for every leaf of this sandbox
        self._name = x509.Name([
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "risoluto egress broker"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"risoluto sandbox CA {sandbox}"),
        ])
        public = self._key.public_key()
        self.cert = (
            x509.CertificateBuilder().subject_name(self._name).issuer_name(self._name).public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW).not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)
        self._contexts: dict[str, ssl.SSLContext] = {}

    def context(self, name: str) -> ssl.SSLContext:
        """A server-side TLS context presenting a leaf for ``name`` (a DNS name or an IP address)."""
        ctx = self._contexts.get(name)
        if ctx is None:
            if len(self._contexts) >= MAX_LEAVES:  # a wildcard entry could otherwise grow it without end
                self._contexts.pop(next(iter(self._contexts)))
            ctx = self._contexts[name] = self._make_context(name)
        return ctx

    def _make_context(self, name: str) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.timezone.utc)
        try:
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
        except ValueError:
            san = x509.DNSName(name)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name[:64])]))
            .issuer_name(self._name).public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - SKEW).not_valid_after(self.not_after)
            .add_extension(x509.SubjectAlternativeName([san]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
            .sign(self._key, hashes.SHA256())
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(["http/1.1"])
        key_pem = self._leaf_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption())
        _load_chain(ctx, leaf.public_bytes(serialization.Encoding.PEM) + self.pem, key_pem)
        return ctx


def _load_chain(ctx: ssl.SSLContext, chain_pem: bytes, key_pem: bytes) -> None:
    """``load_cert_chain`` from memory: anonymous memfds, never a path on disk."""
    fds = [os.memfd_create("risoluto-leaf", os.MFD_CLOEXEC) for _ in range(2)]
    try:
        for fd, data in zip(fds, (chain_pem, key_pem), strict=True):
            os.write(fd, data)
        ctx.load_cert_chain(f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}")
    finally:
        for fd in fds:
            os.close(fd)
