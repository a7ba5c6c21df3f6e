"""The SDK's pure parts, without a service: configuration precedence, SSE parsing, error bodies, --set."""

from __future__ import annotations

import httpx
import pytest

from peeraid_client import ConfigError, NotFound, RateLimited, ServerError, ValidationError, parse_sse, resolve_settings
from peeraid_client.cli import UsageError, merge, parse_assignments
from peeraid_client.errors import error_from_response


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in ("PEERAID_URL", "PEERAID_API_KEY", "PEERAID_CONFIG", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return monkeypatch


def test_settings_precedence(clean_env, tmp_path):
    assert resolve_settings() == resolve_settings(None, None)
    assert resolve_settings().url == "http://127.0.0.1:8000" and resolve_settings().api_key is None

    config = tmp_path / ".config" / "peeraid" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text('url = "http://file:1/"\napi_key = "pk_file"\n')
    assert (resolve_settings().url, resolve_settings().api_key) == ("http://file:1", "pk_file")

    clean_env.setenv("PEERAID_URL", "http://env:2/v1")
    clean_env.setenv("PEERAID_API_KEY", "pk_env")
    assert (resolve_settings().url, resolve_settings().api_key) == ("http://env:2", "pk_env")
    assert resolve_settings("http://arg:3", "pk_arg") == resolve_settings("http://arg:3/", "pk_arg")
    assert resolve_settings("http://arg:3", "pk_arg").api_key == "pk_arg"
    assert resolve_settings("localhost:8000", "k").url == "http://localhost:8000"

    clean_env.setenv("PEERAID_CONFIG", str(tmp_path / "missing.toml"))
    clean_env.delenv("PEERAID_API_KEY")
    with pytest.raises(ConfigError, match=r"missing\.toml does not exist"):
        resolve_settings()
    assert resolve_settings("http://arg:3", "pk_arg").api_key == "pk_arg", "the file is not read when not needed"


def test_parse_sse():
    lines = [": keep-alive", "", "event: job", 'data: {"id": "job_1"}', "", "data: plain", "data: text", "", "event: end", "data: {}", ""]
    assert list(parse_sse(lines)) == [("job", {"id": "job_1"}), ("message", "plain\ntext"), ("end", {})]


def response(code: int, body, headers=None) -> httpx.Response:
    return httpx.Response(code, json=body, headers=headers, request=httpx.Request("GET", "http://x/v1/jobs"))


def test_error_bodies_become_typed_errors():
    err = error_from_response(
        response(
            422,
            {
                "detail": [
                    {"loc": ["body", "peeraid", "tau"], "msg": "peeraid.tau: Input should be a valid number", "type": "value_error"},
                    {"loc": ["body", "specs"], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"},
                    {"loc": ["query", "limit"], "msg": "Input should be less than or equal to 200", "type": "less_than_equal"},
                ]
            },
        )
    )
    assert isinstance(err, ValidationError)
    assert err.errors == [
        ("peeraid.tau", "Input should be a valid number"),
        ("specs", "Extra inputs are not permitted"),
        ("limit", "Input should be less than or equal to 200"),
    ]
    assert str(err).startswith("peeraid.tau: Input should be a valid number; specs: Extra")

    err = error_from_response(response(429, {"detail": "tenant limit reached"}, {"Retry-After": "60"}))
    assert isinstance(err, RateLimited) and err.retry_after == 60 and str(err) == "tenant limit reached"
    assert isinstance(error_from_response(response(404, {"detail": "job x not found"})), NotFound)
    plain = httpx.Response(502, text="Bad Gateway from nginx", request=httpx.Request("GET", "http://x/"))
    err = error_from_response(plain)
    assert isinstance(err, ServerError) and err.status_code == 502 and "nginx" in str(err)


def test_set_assignments_nest_and_parse_json():
    assert parse_assignments(
        ["epochs=30", "peeraid.tau=3", "peeraid.gamma1=0.5", "student=resnet18", "lr_decay_epochs=[75, 90]", "swa=false", "peer=null"]
    ) == {
        "epochs": 30,
        "peeraid": {"tau": 3, "gamma1": 0.5},
        "student": "resnet18",
        "lr_decay_epochs": [75, 90],
        "swa": False,
        "peer": None,
    }
    assert merge({"evaluation": {"n_examples": 20, "autoattack": True}, "epochs": 3}, {"evaluation": {"autoattack": False}}) == {
        "evaluation": {"n_examples": 20, "autoattack": False},
        "epochs": 3,
    }
    for bad in (["epochs"], ["=3"], ["a..b=1"], ["peeraid=1", "peeraid.tau=3"]):
        with pytest.raises(UsageError):
            parse_assignments(bad)


def test_the_clients_artifact_and_status_names_are_the_services():
    from core.db.models import JobStatus
    from core.engine.pipeline import ARTIFACTS
    from peeraid_client.cli import JOB_STATUSES
    from peeraid_client.client import ARTIFACT_NAMES

    assert set(ARTIFACT_NAMES) == set(ARTIFACTS)
    assert list(JOB_STATUSES) == [s.value for s in JobStatus]


def test_a_failed_job_is_never_shown_as_done():
    from peeraid_client.progress import progress_text

    assert progress_text({"status": "succeeded", "progress": {"fraction": 0.2}}) == "done"
    assert progress_text({"status": "failed", "progress": {"fraction": 1.0}}) == "failed at 100%"
    assert progress_text({"status": "running", "progress": {"fraction": 0.25}}) == "25%"


SECRET = "Zq8secretpartofthekey_-x"
KEY = f"pk_0123456789ab_{SECRET}"


def test_api_keys_are_stripped_wherever_they_come_from(clean_env, tmp_path):
    assert resolve_settings(api_key=f" {KEY}\n").api_key == KEY
    clean_env.setenv("PEERAID_API_KEY", f"{KEY} \n")  # as `export PEERAID_API_KEY="$(cat key)\n"` or a copied line
    assert resolve_settings().api_key == KEY
    clean_env.delenv("PEERAID_API_KEY")
    config = tmp_path / "config.toml"
    config.write_text(f'api_key = "{KEY}\\n "\n')
    clean_env.setenv("PEERAID_CONFIG", str(config))
    assert resolve_settings().api_key == KEY
    clean_env.setenv("PEERAID_API_KEY", " \n")  # blank counts as unset
    assert resolve_settings().api_key == KEY


def test_a_key_that_cannot_be_sent_is_refused_without_showing_it(clean_env):
    from peeraid_client import Client

    for broken in (f"pk_0123456789ab_{SECRET[:8]}\n{SECRET[8:]}", f"pk_0123456789ab_{SECRET} extra", f"pk_0123456789ab_{SECRET}é"):
        clean_env.setenv("PEERAID_API_KEY", broken)
        with pytest.raises(ConfigError) as err:
            Client("http://127.0.0.1:9")
        message = str(err.value)
        assert "PEERAID_API_KEY" in message and "pk_0123456789ab_…" in message, message
        assert SECRET[:8] not in message and SECRET[8:] not in message, message


def test_key_hints_show_the_prefix_at_most():
    from peeraid_client.config import key_hint

    assert key_hint(KEY) == "pk_0123456789ab_…"
    assert SECRET not in key_hint(KEY)
    assert key_hint("not-a-key-at-all") == "a key not of the form pk_<prefix>_<secret>"
    assert key_hint("pk_" + "a" * 40) == "a key not of the form pk_<prefix>_<secret>"
