"""Signed decisions and model-file digests (Ed25519, the ``cryptography`` package).

The project's processes (the gate, ``churn canary evaluate``, rollback, ``churn canary promote
--force``, ``churn registry approve``) hold the private key (``registry.signing_key_file``,
mode 0600, made by ``churn registry keygen``) and sign what they decided. The guard plugin of
``mlflow server``, ``churn serve`` and ``churn registry verify`` hold only public keys
(``registry.verify_key_file``: one key a line, several for rotation), so a compromised
tracking server, or a user with write access to the registry, cannot mint a decision.

A decision is stored as a version tag ``churn.sig.<kind>`` (one of :data:`KINDS`) whose value
is a JSON envelope ``{"payload": {...}, "key_id": ..., "sig": <base64>}``; the signature is
over the canonical JSON of the payload (sorted keys, no spaces). The payload names exactly
the move it allows: model name, version, the version's identity (:func:`version_identity`:
model id / source run / source / creation time, so a re-used version number or a copy is a
different version), the decision, the champion it was compared with (:func:`version_ref`),
the decision run, a digest of the metrics and the SHA-256 of the model's files
(:func:`files_digest`). Tags and runs are evidence for people to read; the signature is what
the guard trusts.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import logging
import os
import stat
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from mlflow_churn.config import ChurnConfig
from mlflow_churn.errors import ChurnError
from mlflow_churn.registry.vocab import CanaryVerdict, GateVerdict, SignedKind
from mlflow_churn.tags import SIG_PREFIX

_log = logging.getLogger("mlflow_churn.signing")

#: the kinds of signed decision and what their ``decision`` field may say
KINDS: dict[str, tuple[str, ...]] = {
    SignedKind.GATE: tuple(GateVerdict),
    SignedKind.CANARY: (CanaryVerdict.PROMOTE, CanaryVerdict.ROLLBACK, CanaryVerdict.WAIT),
    SignedKind.ROLLBACK: ("rollback",),
    SignedKind.OVERRIDE: ("override",),
    SignedKind.APPROVAL: ("approved",),
    #: the canary's rollout weight (``churn.rollout.weight``): its value is in ``metrics_sha256``
    #: (:func:`metrics_digest` of ``{"weight": <the tag's text>}``), signed by the controller
    SignedKind.ROLLOUT: ("weight",),
}
#: files MLflow itself writes into a registered version's directory (``registered_model_meta``
#: when ``models:/`` is loaded in place from a local store): not the model, not digested
UNSIGNED_FILES = frozenset({"registered_model_meta"})
ENVELOPE_LIMIT = 4900  # a version tag holds 5000 characters on every store


class SignatureError(ChurnError):
    """A signed decision that is missing, malformed, does not verify, or is for another move."""


def sig_tag(kind: str) -> str:
    """The version tag of a signed decision of ``kind``."""
    if kind not in KINDS:
        raise ValueError(f"unknown decision kind {kind!r}; one of {', '.join(KINDS)}")
    return SIG_PREFIX + kind


@dataclass(frozen=True)
class Decision:
    """What a signed decision says; every field is signed."""

    kind: str  # KINDS
    model: str  # registered model name
    version: str  # version number, as text
    identity: str  # version_identity() of that version
    decision: str  # KINDS[kind]
    champion: str  # version_ref() of the champion compared with / replaced / restored; "" = none
    run_id: str  # the decision run (gate, canary-evaluate, rollback, promote run)
    metrics_sha256: str  # metrics_digest() of the decision's metrics
    files_sha256: str  # files_digest() of the version's model files
    issued_at: str  # ISO 8601 UTC
    actor: str  # who decided (OS user, approver, ...)
    reason: str = ""  # a person's reason (override, rollback, approval), <= 300 characters
    key_id: str = ""  # the key that signed it (set by Signer.sign)

    def canonical(self) -> bytes:
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()

    @property
    def issued(self) -> datetime:
        return datetime.fromisoformat(self.issued_at)

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def version_identity(mv: Any) -> str:
    """A registered version's identity: SHA-256 (first 32 hex) of its model id, source run,
    source and creation time. A version number re-used after a delete, a copy into another
    model or a version re-created with the same number has another identity."""
    parts = [str(getattr(mv, "model_id", None) or ""), str(mv.run_id or ""), str(mv.source or ""),
             str(mv.creation_timestamp or "")]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def version_ref(mv: Any | None) -> str:
    """``"<version>:<identity>"`` of ``mv``; "" for none (no champion)."""
    return "" if mv is None else f"{mv.version}:{version_identity(mv)}"


def metrics_digest(metrics: Mapping[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``metrics`` (floats as repr, so a changed digit changes it)."""
    clean = {str(k): (repr(float(v)) if isinstance(v, int | float) else str(v)) for k, v in metrics.items()}
    return hashlib.sha256(json.dumps(clean, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def files_digest(root: str | Path) -> str:
    """SHA-256 over every file under ``root`` (but :data:`UNSIGNED_FILES`): sorted relative paths
    with each file's SHA-256. Any changed, added, removed or renamed file changes it."""
    root = Path(root)
    if not root.is_dir():
        raise ChurnError(f"cannot digest model files: {root} is not a directory")
    outer = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix()
                       not in UNSIGNED_FILES):
        with open(path, "rb") as fh:
            inner = hashlib.file_digest(fh, "sha256")
        outer.update(f"{path.relative_to(root).as_posix()}\0{inner.hexdigest()}\n".encode())
    return outer.hexdigest()


def download_version(client: Any, name: str, version: str, dst: str | Path) -> Path:
    """Download the files of version ``version`` of ``name`` into ``dst``; the local directory."""
    import mlflow.artifacts

    uri = client.get_model_version_download_uri(name, str(version))
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst),
                                                    tracking_uri=client._tracking_client.tracking_uri))


def version_files_digest(client: Any, name: str, version: str) -> str:
    """:func:`files_digest` of the registered version's files as the store serves them now."""
    with tempfile.TemporaryDirectory(prefix="churn-digest-") as tmp:
        return files_digest(download_version(client, name, version, tmp))


# --------------------------------------------------------------------------- keys
def _key_id(raw_public: bytes) -> str:
    return hashlib.sha256(raw_public).hexdigest()[:16]


def signing_key_path(cfg: ChurnConfig) -> Path:
    return Path(cfg.registry.signing_key_file or cfg.workspace / "keys" / "signing.key")


def verify_key_path(cfg: ChurnConfig) -> Path:
    return Path(cfg.registry.verify_key_file or cfg.workspace / "keys" / "verify.pub")


@dataclass(frozen=True)
class KeygenResult:
    key_id: str
    signing_key_file: str
    verify_key_file: str
    verify_key_ids: list[str]  # every key the verify file now holds (rotation keeps old ones)
    rotated_from: str | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def keygen(signing_file: Path, verify_file: Path, rotate: bool = False,
           now: datetime | None = None) -> KeygenResult:
    """Make an Ed25519 key pair: the private key to ``signing_file`` (0600, PKCS#8 PEM), its
    public key appended to ``verify_file``. An existing signing key is kept unless
    ``rotate``: then it is replaced and its public key stays in ``verify_file`` (decisions it
    signed keep verifying until that line is removed)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    old_id = None
    if signing_file.exists():
        old_id = Signer.load(signing_file).key_id
        if not rotate:
            raise ChurnError(f"a signing key exists at {signing_file} (key {old_id}); pass --rotate to "
                             "replace it (its public key stays in the verify file)")
    key = Ed25519PrivateKey.generate()
    raw_pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    signing_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = signing_file.with_name(signing_file.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(tmp, 0o600)
    when = (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    verify_file.parent.mkdir(parents=True, exist_ok=True)
    with open(verify_file, "a") as fh:
        fh.write(f"ed25519 {base64.b64encode(raw_pub).decode()} {_key_id(raw_pub)} {when}\n")
    os.replace(tmp, signing_file)
    return KeygenResult(_key_id(raw_pub), str(signing_file), str(verify_file),
                        Verifier.load([verify_file]).key_ids, old_id)


class Signer:
    """The private key; signs :class:`Decision` s. Never logged, never in a message."""

    def __init__(self, key: Any) -> None:
        from cryptography.hazmat.primitives import serialization

        self._key = key
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.key_id = _key_id(raw)

    def __repr__(self) -> str:
        return f"Signer(key_id={self.key_id})"

    @classmethod
    def load(cls, path: Path) -> Signer:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            mode = path.stat().st_mode
        except FileNotFoundError:
            raise ChurnError(f"no signing key at {path}; make one with `churn registry keygen` (or set "
                             "registry.signing_key_file)") from None
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ChurnError(f"signing key {path} is readable by others (mode {oct(mode & 0o777)}); "
                             f"run `chmod 600 {path}`")
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except Exception:  # never quote the file
            raise ChurnError(f"signing key {path} is not a PEM Ed25519 private key; make one with "
                             "`churn registry keygen`") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ChurnError(f"signing key {path} is not an Ed25519 key; make one with "
                             "`churn registry keygen`")
        return cls(key)

    def sign(self, decision: Decision) -> str:
        """The tag value (JSON envelope) of ``decision`` signed by this key."""
        if decision.kind not in KINDS or decision.decision not in KINDS[decision.kind]:
            raise ValueError(f"decision {decision.kind}={decision.decision} is not signable")
        d = replace(decision, key_id=self.key_id, reason=decision.reason[:300])
        sig = base64.b64encode(self._key.sign(d.canonical())).decode()
        value = json.dumps({"payload": d.to_dict(), "sig": sig}, sort_keys=True, separators=(",", ":"))
        if len(value) > ENVELOPE_LIMIT:
            raise ChurnError(f"signed decision of {decision.model} v{decision.version} is {len(value)} "
                             f"characters, over the tag limit {ENVELOPE_LIMIT}; shorten the reason")
        return value


class Verifier:
    """The public keys a signature may verify with (several: rotation)."""

    def __init__(self, keys: Mapping[str, Any]) -> None:
        self._keys = dict(keys)

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    @classmethod
    def load(cls, paths: Iterable[Path]) -> Verifier:
        """Keys from verify files (lines ``ed25519 <base64 raw key> [key id] [comment]``; ``#``
        comments). A missing file is no keys (nothing verifies: every protected move is refused)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        keys: dict[str, Any] = {}
        for path in paths:
            try:
                text = Path(path).read_text()
            except FileNotFoundError:
                continue
            for n, line in enumerate(text.splitlines(), 1):
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                parts = line.split()
                try:
                    if parts[0] != "ed25519":
                        raise ValueError(parts[0])
                    raw = base64.b64decode(parts[1], validate=True)
                    keys[_key_id(raw)] = Ed25519PublicKey.from_public_bytes(raw)
                except (ValueError, IndexError):
                    raise ChurnError(f"{path}:{n}: not a verify key line (want 'ed25519 <base64 key> "
                                     "[id]'); make keys with `churn registry keygen`") from None
        return cls(keys)

    def verify(self, value: str | None) -> Decision:
        """The :class:`Decision` in tag value ``value``; SignatureError unless it is well formed and
        its signature verifies with one of the keys."""
        from cryptography.exceptions import InvalidSignature

        if not value:
            raise SignatureError("no signed decision")
        try:
            env = json.loads(value)
            payload = env["payload"]
            names = {f.name for f in fields(Decision)}
            if not isinstance(payload, dict) or set(payload) != names or \
                    not all(isinstance(v, str) for v in payload.values()):
                raise ValueError("fields")
            decision = Decision(**payload)
            sig = base64.b64decode(env["sig"], validate=True)
            decision.issued  # noqa: B018 - a parseable time
        except (ValueError, KeyError, TypeError):
            raise SignatureError("a malformed signed decision") from None
        key = self._keys.get(decision.key_id)
        if key is None:
            known = ", ".join(self.key_ids) or "none: no verify key file"
            raise SignatureError(f"signed by key {decision.key_id[:16]!r}, not a verify key (known: {known})")
        try:
            key.verify(sig, decision.canonical())
        except InvalidSignature:
            raise SignatureError(f"the signature of the {decision.kind} decision does not verify "
                                 f"(key {decision.key_id})") from None
        return decision


def signer_for(cfg: ChurnConfig) -> Signer:
    """The project's signing key. The default location (``<workspace>/keys/signing.key``) is
    made on first use (with its verify file), so the embedded demo signs with no setup; a
    configured ``registry.signing_key_file`` that is missing is an error."""
    path = signing_key_path(cfg)
    if cfg.registry.signing_key_file is None and not path.exists():
        try:
            keygen(path, verify_key_path(cfg))
            _log.warning("made a signing key at %s (first use in this workspace)", path)
        except ChurnError:  # another process made it first
            pass
    return Signer.load(path)


def verifier_for(cfg: ChurnConfig) -> Verifier:
    """The verify keys of ``registry.verify_key_file`` (plus ``registry.extra_verify_key_files``)."""
    return Verifier.load([verify_key_path(cfg), *map(Path, cfg.registry.extra_verify_key_files)])


def record_signed(client: Any, cfg: ChurnConfig, name: str, version: str, kind: str, decision: str, *,
                  champion: Any | None, run_id: str, metrics: Mapping[str, Any] | None = None,
                  reason: str = "", actor: str | None = None, files_sha256: str | None = None,
                  signer: Signer | None = None, now: datetime | None = None) -> Decision:
    """Sign a ``kind`` decision about ``version`` of ``name`` and store it as the version's tag
    ``churn.sig.<kind>`` (the guard checks it on its way in). ``champion``: the ModelVersion
    compared with / replaced / restored (None: none). ``files_sha256`` defaults to the digest
    the version's signed gate decision names (the gate computes it from the files)."""
    mv = client.get_model_version(name, str(version))
    if files_sha256 is None:
        gate = (mv.tags or {}).get(sig_tag(SignedKind.GATE))
        try:
            files_sha256 = verifier_for(cfg).verify(gate).files_sha256 if gate else None
        except SignatureError:
            files_sha256 = None
        if files_sha256 is None:
            files_sha256 = version_files_digest(client, name, str(version))
    d = Decision(kind=kind, model=name, version=str(mv.version), identity=version_identity(mv),
                 decision=decision, champion=version_ref(champion), run_id=run_id or "",
                 metrics_sha256=metrics_digest(metrics or {}), files_sha256=files_sha256,
                 issued_at=now_iso(now), actor=actor or default_actor(), reason=reason[:300])
    value = (signer or signer_for(cfg)).sign(d)
    client.set_model_version_tag(name, str(mv.version), sig_tag(kind), value)
    return d


def default_actor() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in a container
        return f"uid-{os.getuid()}"


def now_iso(now: datetime | None = None) -> str:
    return (now or datetime.now(UTC)).astimezone(UTC).isoformat()


__all__ = ["Decision", "KINDS", "SIG_PREFIX", "SignatureError", "Signer", "Verifier", "KeygenResult",
           "default_actor", "download_version", "record_signed", "files_digest", "keygen", "metrics_digest",
           "now_iso",
           "sig_tag", "signer_for", "signing_key_path", "verifier_for", "verify_key_path",
           "version_files_digest", "version_identity", "version_ref"]
