"""Token verification: algorithms, expiry, scopes, and what each scope may do."""

from __future__ import annotations

import base64
import json
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tests.support.process import TEST_SECRET

from phasecast.config import Settings
from phasecast.errors import ConfigurationError
from phasecast.model import new_job, utc_now
from phasecast.server.auth import Forbidden, TokenVerifier, Unauthorized, mint_token

SETTINGS = Settings(jwt_secret=TEST_SECRET)


def b64(data: dict[str, object]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def test_a_minted_token_verifies_with_its_scopes() -> None:
    principal = TokenVerifier(SETTINGS).verify(mint_token(SETTINGS, "alice", ["jobs:read"]))
    assert principal.sub == "alice"
    assert principal.scopes == {"jobs:read"}
    assert not principal.is_worker


def test_alg_none_is_refused() -> None:
    token = f"{b64({'alg': 'none', 'typ': 'JWT'})}.{b64({'sub': 'eve', 'exp': time.time() + 60})}."
    with pytest.raises(Unauthorized, match="algorithm 'none'"):
        TokenVerifier(SETTINGS).verify(token)


def test_an_unexpected_algorithm_is_refused() -> None:
    token = jwt.encode({"sub": "eve", "exp": time.time() + 60}, TEST_SECRET * 2, algorithm="HS512")
    with pytest.raises(Unauthorized, match="HS512"):
        TokenVerifier(SETTINGS).verify(token)


def test_expired_wrong_key_missing_exp_and_garbage_are_refused() -> None:
    verifier = TokenVerifier(SETTINGS)
    expired = jwt.encode({"sub": "a", "exp": time.time() - 3600}, TEST_SECRET, algorithm="HS256")
    forged = jwt.encode({"sub": "a", "exp": time.time() + 60}, "x" * 40, algorithm="HS256")
    no_exp = jwt.encode({"sub": "a"}, TEST_SECRET, algorithm="HS256")
    for token, reason in ((expired, "expired"), (forged, "Signature"), (no_exp, "exp"), ("abc", "not a JWT")):
        with pytest.raises(Unauthorized, match=reason):
            verifier.verify(token)


def test_es256_with_a_public_key() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    settings = Settings(jwt_algorithm="ES256", jwt_public_key=public_pem, jwt_private_key=private_pem)
    principal = TokenVerifier(settings).verify(mint_token(settings, "bob", ["admin"]))
    assert principal.is_admin and principal.is_worker
    # An HS256 token signed with the public key's text must not pass (key confusion).
    with pytest.raises(Unauthorized):
        TokenVerifier(settings).verify(jwt.encode({"sub": "eve", "exp": time.time() + 60}, "k" * 40))


def test_short_secrets_and_unknown_algorithms_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="32 bytes"):
        Settings(jwt_secret="short").check()
    with pytest.raises(ConfigurationError, match="not supported"):
        Settings(jwt_secret=TEST_SECRET, jwt_algorithm="none").check()


def test_owners_read_their_own_jobs_only_and_workers_read_all() -> None:
    verifier = TokenVerifier(SETTINGS)
    state = new_job(job_id="j", owner="alice", kind="comic", metadata={}, now=utc_now())
    alice = verifier.verify(mint_token(SETTINGS, "alice", ["jobs:read"]))
    bob = verifier.verify(mint_token(SETTINGS, "bob", ["jobs:read"]))
    worker = verifier.verify(mint_token(SETTINGS, "w", ["jobs:write"]))
    assert alice.can_read(state) and worker.can_read(state)
    assert not bob.can_read(state)
    with pytest.raises(Forbidden):
        bob.require_read(state)
    with pytest.raises(Forbidden):
        alice.require_write()
