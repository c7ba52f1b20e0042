"""Secrets handed to one node only: the controller reads a Secret a VM or VmImage references and
seals its value to the public key of the agent of the node that needs it (X25519, HKDF-SHA256,
ChaCha20-Poly1305: a sealed box). The sealed value lives in the object's status, where anyone who
may read the object sees ciphertext only that one agent can open. So an agent needs no right to
read Secrets, which RBAC could not limit to its own node's.

Each agent keeps its private key in its state directory (root only), so a restarted agent opens
what was sealed before; it publishes the public key on its Node.
"""

import base64
import hashlib
import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from formation_vmm.host.atomic import write_bytes
from formation_vmm.host.paths import open_read

INFO = b"formation-vmm sealed secret v1"


class SealError(ValueError):
    """Sealed data that does not open with this key (another node's, or tampered with)."""


def key_id(public: bytes) -> str:
    """A short name of a public key: which key a value was sealed to."""
    return hashlib.sha256(public).hexdigest()[:16]


def _derive(shared: bytes, ephemeral: bytes, recipient: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=ephemeral + recipient, info=INFO).derive(shared)


def seal(recipient_b64: str, plaintext: bytes, context: str) -> str:
    """``plaintext`` sealed to the public key ``recipient_b64``; ``context`` (what the value is
    for: namespace, object, Secret, key) is bound to it, so a sealed value copied to another
    object does not open there."""
    recipient = base64.b64decode(recipient_b64)
    ephemeral = X25519PrivateKey.generate()
    epub = ephemeral.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    key = _derive(ephemeral.exchange(X25519PublicKey.from_public_bytes(recipient)), epub, recipient)
    nonce = os.urandom(12)
    box = ChaCha20Poly1305(key).encrypt(nonce, plaintext, context.encode())
    return base64.b64encode(epub + nonce + box).decode()


class NodeKey:
    """The agent's key pair, kept in ``path`` (created on first use, 0600)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._private = self._load()
        self.public = self._private.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def _load(self) -> X25519PrivateKey:
        try:
            with os.fdopen(open_read(self.path), "rb") as f:
                return X25519PrivateKey.from_private_bytes(f.read(32))
        except FileNotFoundError:
            key = X25519PrivateKey.generate()
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            raw = key.private_bytes(
                serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
            )
            write_bytes(self.path, raw, mode=0o600)
            return key

    @property
    def public_b64(self) -> str:
        return base64.b64encode(self.public).decode()

    @property
    def id(self) -> str:
        return key_id(self.public)

    def open(self, sealed_b64: str, context: str) -> bytes:
        try:
            raw = base64.b64decode(sealed_b64)
            epub, nonce, box = raw[:32], raw[32:44], raw[44:]
            shared = self._private.exchange(X25519PublicKey.from_public_bytes(epub))
            return ChaCha20Poly1305(_derive(shared, epub, self.public)).decrypt(nonce, box, context.encode())
        except Exception as exc:  # any failure is the same to the caller: it does not open
            raise SealError("the sealed value does not open with this node's key") from exc


def user_data_context(namespace: str, vm: str, uid: str, secret: str, key: str) -> str:
    """What sealed user data is for: this VM (by uid), from this Secret key."""
    return f"userdata:{namespace}/{vm}/{uid}:{secret}/{key}"


def image_context(namespace: str, image: str, uid: str, secret: str, key: str) -> str:
    """What a sealed Authorization value is for: this VmImage (by uid), from this Secret key."""
    return f"image:{namespace}/{image}/{uid}:{secret}/{key}"
