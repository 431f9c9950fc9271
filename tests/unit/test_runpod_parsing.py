"""RunPod payload parsing, progress shapes, error decoding and webhook URL signing."""

from __future__ import annotations

import json
from urllib.parse import parse_qs, urlsplit

import pytest

from phasecast.integrations.runpod import (
    MAX_ERROR_TEXT,
    InvalidPayload,
    RunPodStatus,
    decode_error,
    derive_webhook_secret,
    output_progress,
    verify_webhook_token,
    webhook_token,
    webhook_url,
)
from phasecast.model import JobError, validate_job_error


@pytest.mark.parametrize(
    ("output", "expected"),
    [
        ({"progress": 0.4}, 40.0),
        ({"progress": 40}, 40.0),
        ({"progress": "0.25"}, 25.0),
        ("4/10", 40.0),
        (" 3 / 4 ", 75.0),
        ("40%", 40.0),
        ("0.5", 50.0),
        (0.9, 90.0),
        (55, 55.0),
        ({"step": 4, "total": 10}, 40.0),
        ({"current": 1, "steps": 4}, 25.0),
        ({"percent": 40}, 40.0),
        ({"percent": 1}, 1.0),
        ({"percentage": 12.5}, 12.5),
        (250, 100.0),
        ("7/5", 100.0),
    ],
)
def test_output_progress_shapes(output: object, expected: float) -> None:
    assert output_progress(output) == pytest.approx(expected)


@pytest.mark.parametrize(
    "output",
    [None, True, "warming up", {"status": "loading model"}, {"step": 1, "total": 0}, -3, "1/0",
     float("nan"), float("inf"), [1, 2]],
)
def test_output_without_progress_is_none(output: object) -> None:
    assert output_progress(output) is None


def test_decode_json_encoded_error_from_the_python_sdk() -> None:
    error = json.dumps({
        "error_type": "<class 'torch.cuda.OutOfMemoryError'>",
        "error_message": "CUDA out of memory",
        "error_traceback": "Traceback ...",
    })
    assert decode_error(error) == ("torch.cuda.OutOfMemoryError", "CUDA out of memory")


def test_decode_plain_and_missing_errors() -> None:
    assert decode_error("worker exited with code 137") == ("runpod_failed", "worker exited with code 137")
    assert decode_error(None)[0] == "runpod_failed"
    assert decode_error({"message": "bad input"}) == ("runpod_failed", "bad input")


@pytest.mark.parametrize("error", [
    "x" * 5000,
    "out of memory\x00 at \ud800 step",
    json.dumps({"error_type": "<class '" + "Very" * 40 + "Error'>", "error_message": "m\x00" * 900}),
    json.dumps({"error_type": "\x00\x00", "error_message": "\udfff"}),
    {"error_type": 5, "error_message": ["not", "text"]},
    {"no": "message"},
])
def test_any_runpod_error_decodes_to_text_a_job_can_keep(error: object) -> None:
    code, message = decode_error(error)
    validate_job_error(JobError(code, message))  # raises if a job could not keep it
    assert len(message) <= MAX_ERROR_TEXT and "\x00" not in message


def test_status_parse_accepts_runpod_fields() -> None:
    status = RunPodStatus.parse({"id": "abc-1", "status": "COMPLETED", "output": {"x": 1},
                                 "delayTime": 12, "executionTime": 3400, "retries": 0,
                                 "input": {}, "webhook": "http://x"})
    assert status.terminal
    assert status.execution_time_ms == 3400


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        ([], "body"),
        ({"status": "COMPLETED"}, "id"),
        ({"id": "a b", "status": "COMPLETED"}, "id"),
        ({"id": "abc", "status": "DONE"}, "status"),
        ({"id": "abc", "status": "COMPLETED", "executionTime": -1}, "executionTime"),
        ({"id": "abc", "status": "COMPLETED", "delayTime": "soon"}, "delayTime"),
    ],
)
def test_status_parse_names_the_bad_field(payload: object, field: str) -> None:
    with pytest.raises(InvalidPayload) as caught:
        RunPodStatus.parse(payload)
    assert caught.value.field == field


def test_webhook_urls_are_signed_per_job_and_step() -> None:
    secret = "s3cret"
    url = webhook_url("https://phasecast.example/", secret, "job-1", "panel-2")
    parts = urlsplit(url)
    assert parts.path == "/v1/integrations/runpod/webhook"
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    assert query["job"] == "job-1"
    assert query["step"] == "panel-2"
    assert verify_webhook_token(secret, "job-1", "panel-2", query["token"])
    assert not verify_webhook_token(secret, "job-1", "panel-3", query["token"])
    assert not verify_webhook_token(secret, "job-2", "panel-2", query["token"])
    assert not verify_webhook_token("other", "job-1", "panel-2", query["token"])
    assert webhook_token(secret, "a", "bc") != webhook_token(secret, "ab", "c")


def test_derived_webhook_secret_is_stable_and_not_the_jwt_secret() -> None:
    assert derive_webhook_secret("x" * 40) == derive_webhook_secret("x" * 40)
    assert derive_webhook_secret("x" * 40) != "x" * 40
    assert derive_webhook_secret(None) is None


def test_runpod_bodies_are_parsed_strictly_but_brackets_in_strings_are_just_text() -> None:
    import pytest

    from phasecast.integrations.runpod import InvalidPayload, load_json

    assert load_json(b'{"id": "a", "output": "' + b"[" * 500 + b'"}')["id"] == "a"
    for body in (b'{"output": NaN}', b'{"output": "\\ud800"}', b"[" * 10_000 + b"]" * 10_000,
                 b'{"a": ' * 40 + b"1" + b"}" * 40):
        with pytest.raises(InvalidPayload):
            load_json(body)
    with pytest.raises(ValueError, match="UTF-8"):
        load_json(b'{"id": "\xff"}')
