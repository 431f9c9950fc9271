"""The RunPod integration's own settings: read from the environment by the integration, not
by the core server settings."""

from __future__ import annotations

import dataclasses

import pytest

from phasecast.config import Settings
from phasecast.errors import ConfigurationError
from phasecast.integrations.settings import RunPodSettings


def test_defaults_leave_the_integration_off() -> None:
    found = RunPodSettings.from_env({})
    assert not found.configured
    assert found.base_url == "https://api.runpod.ai/v2"


def test_values_come_from_phasecast_runpod_variables() -> None:
    found = RunPodSettings.from_env({
        "PHASECAST_RUNPOD_ENDPOINT": "ep", "PHASECAST_RUNPOD_API_KEY": "key",
        "PHASECAST_RUNPOD_POLL_INTERVAL": "0.5", "PHASECAST_RUNPOD_MAX_RETRIES": "4",
        "PHASECAST_RUNPOD_NOT_FOUND_GRACE": "2", "PHASECAST_RUNPOD_JOB_TTL": "900",
        "PHASECAST_WEBHOOK_SECRET": "s" * 40,
    })
    assert found.configured and (found.endpoint, found.api_key) == ("ep", "key")
    assert (found.poll_interval, found.max_retries, found.not_found_grace, found.job_ttl) == (0.5, 4, 2.0, 900.0)
    assert found.webhook_secret == "s" * 40


@pytest.mark.parametrize(("name", "value", "message"), [
    ("PHASECAST_RUNPOD_POLL_INTERVAL", "0", "POLL_INTERVAL must be a number of seconds"),
    ("PHASECAST_RUNPOD_LEASE_SECONDS", "5000", "LEASE_SECONDS must be a number of seconds"),
    ("PHASECAST_RUNPOD_JOB_TTL", "-1", "JOB_TTL must be a number of seconds"),
    ("PHASECAST_RUNPOD_MAX_RETRIES", "11", "MAX_RETRIES must be from 0 to 10"),
    ("PHASECAST_RUNPOD_REQUEST_TIMEOUT", "soon", "is not a valid float"),
])
def test_bad_values_are_refused_with_the_variable_named(name: str, value: str, message: str) -> None:
    with pytest.raises(ConfigurationError, match=message):
        RunPodSettings.from_env({name: value})


def test_an_endpoint_needs_an_api_key() -> None:
    with pytest.raises(ConfigurationError, match="PHASECAST_RUNPOD_API_KEY"):
        RunPodSettings.from_env({"PHASECAST_RUNPOD_ENDPOINT": "ep"})


def test_the_core_settings_know_nothing_of_runpod() -> None:
    names = {f.name for f in dataclasses.fields(Settings)}
    assert not {n for n in names if "runpod" in n or "webhook" in n}
