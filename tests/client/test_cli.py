"""The `peeraid` command line as a user runs it (a subprocess with PEERAID_URL / PEERAID_API_KEY or a
config file) against a real service."""

from __future__ import annotations

import hashlib
import json
import secrets

import pytest

from .conftest import cli_env, free_port, run_cli

# The client is backend-agnostic: it runs against the production deployment (PostgreSQL + Redis).
pytestmark = [pytest.mark.slow, pytest.mark.parametrize("stack", ["postgres-redis"], indirect=True)]


@pytest.fixture
def env(stack, api_key, tmp_path):
    return cli_env(PEERAID_URL=stack.url, PEERAID_API_KEY=api_key, HOME=str(tmp_path / "home"))


def test_upload_submit_watch_show_and_download(env, digits_file, tmp_path, sdk):
    uploaded = run_cli("datasets", "upload", str(digits_file), "--name", "cli-digits", env=env)
    assert uploaded.returncode == 0, uploaded.stderr
    dataset_id = uploaded.stdout.strip()
    assert dataset_id.startswith("ds_") and "1438 train" in uploaded.stderr
    listed = run_cli("datasets", "list", env=env)
    assert dataset_id in listed.stdout and "cli-digits" in listed.stdout and "built-in" in listed.stdout

    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"attack_steps": 2, "eval_pgd_steps": 2, "evaluation": {"n_examples": 20, "autoattack": True}}))
    submitted = run_cli(
        "jobs",
        "submit",
        "--preset",
        "digits-demo",
        "--dataset",
        dataset_id,
        "--spec",
        str(spec),
        "--set",
        "epochs=2",
        "--set",
        "lr_decay_epochs=[1]",
        "--set",
        "evaluation.autoattack=false",
        "--watch",
        env=env,
    )
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    assert job_id.startswith("job_")
    assert "100%|" in submitted.stderr and "epoch 2/2" in submitted.stderr and "img/s" in submitted.stderr
    assert "status    succeeded" in submitted.stdout
    job = sdk.get_job(job_id)
    assert job["spec"]["epochs"] == 2 and job["spec"]["attack_steps"] == 2 and job["spec"]["evaluation"]["autoattack"] is False
    assert job["spec"]["evaluation"]["n_examples"] == 20, "--set evaluation.x merges into the spec file's evaluation"

    shown = run_cli("jobs", "show", job_id, env=env)
    assert shown.returncode == 0, shown.stderr
    for fragment in (
        f"job       {job_id}",
        "status    succeeded",
        f"dataset   cli-digits ({dataset_id})",
        "epoch 2/2",
        "latest    student clean",
        "best      student clean",
        "test-set report",
        "clean",
        "fgsm",
        "pgd20",
    ):
        assert fragment in shown.stdout, (fragment, shown.stdout)
    report_row = next(line for line in shown.stdout.splitlines() if line.startswith("student "))
    assert f"{job['result']['student']['test']['clean_acc']:.1%}" in report_row
    assert json.loads(run_cli("jobs", "show", job_id, "--json", env=env).stdout)["status"] == "succeeded"
    assert job_id in run_cli("jobs", "list", "--status", "succeeded", env=env).stdout
    assert job_id not in run_cli("jobs", "list", "--status", "failed", env=env).stdout

    downloaded = run_cli("jobs", "download", job_id, "-o", str(tmp_path / "all"), env=env)
    assert downloaded.returncode == 0, downloaded.stderr
    listing = sdk.list_artifacts(job_id)
    assert downloaded.stdout.count("sha256 verified") == len(listing) >= 4
    for artifact in listing:
        data = (tmp_path / "all" / f"{job_id}-{artifact['file_name']}").read_bytes()
        assert hashlib.sha256(data).hexdigest() == artifact["sha256"]
    one = run_cli("jobs", "download", job_id, "--artifact", "student", "-o", str(tmp_path / "one"), env=env)
    assert one.returncode == 0 and [p.name for p in (tmp_path / "one").iterdir()] == [f"{job_id}-student.safetensors"]

    curves = run_cli("jobs", "curves", job_id, "-o", str(tmp_path / "curves.png"), env=env)
    assert curves.returncode == 0, curves.stderr
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"

    watched = run_cli("jobs", "watch", job_id, env=env)
    assert watched.returncode == 0 and "status    succeeded" in watched.stdout
    cancelled = run_cli("jobs", "cancel", job_id, env=env)
    assert cancelled.returncode == 1 and cancelled.stderr.strip() == f"error: job {job_id} already succeeded"


def test_watch_exits_1_when_the_job_does_not_succeed(env):
    submitted = run_cli("jobs", "submit", "--preset", "digits-demo", "--set", "epochs=60", "--set", "lr_decay_epochs=[50]", env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    cancelled = run_cli("jobs", "cancel", job_id, env=env)
    assert cancelled.returncode == 0 and job_id in cancelled.stdout
    watched = run_cli("jobs", "watch", job_id, env=env, timeout=120)
    assert watched.returncode == 1, watched.stderr
    assert "status    cancelled" in watched.stdout and "CANCELLED" in watched.stderr
    listed = run_cli("jobs", "list", env=env).stdout
    assert "cancelled at" in next(line for line in listed.splitlines() if line.startswith(job_id))


def test_errors_print_the_service_message_and_exit_1(stack, env):
    bad_key = run_cli("--api-key", "pk_0000_nonsense", "jobs", "list", env=env)
    assert bad_key.returncode == 1 and bad_key.stderr.startswith("error: the API key was refused (pk_0000_…, from --api-key)")
    assert "Authorization" not in bad_key.stderr  # words for a command-line user, not for an HTTP client
    no_key = run_cli("jobs", "list", env={k: v for k, v in env.items() if k != "PEERAID_API_KEY"})
    assert no_key.returncode == 1 and "no API key configured" in no_key.stderr

    missing = run_cli("jobs", "show", "job_doesnotexist", env=env)
    assert missing.returncode == 1 and missing.stderr.strip() == "error: job job_doesnotexist not found"

    invalid = run_cli("jobs", "submit", "--preset", "digits-demo", "--set", "epochs=-1", "--set", "peeraid.tau=warm", env=env)
    assert invalid.returncode == 1 and invalid.stdout == ""
    lines = invalid.stderr.splitlines()
    assert lines[0] == "error: epochs: Input should be greater than or equal to 1"
    assert lines[1].startswith("error: peeraid.tau: Input should be a valid number")

    unreachable = run_cli("--url", f"http://127.0.0.1:{free_port()}", "jobs", "list", env=env)
    assert unreachable.returncode == 1 and unreachable.stderr.startswith("error: cannot reach the service")

    for usage in (["jobs", "submit", "--set", "epochs"], ["jobs", "frobnicate"], ["jobs", "submit", "--spec", "/nonexistent.json"]):
        result = run_cli(*usage, env=env)
        assert result.returncode == 2, (usage, result.stderr)


def test_the_config_file_and_its_precedence(stack, api_key, tmp_path):
    home = tmp_path / "home"
    default_config = home / ".config" / "peeraid" / "config.toml"
    default_config.parent.mkdir(parents=True)
    default_config.write_text(f'url = "{stack.url}"\napi_key = "{api_key}"\n')
    env = cli_env(HOME=str(home))
    assert run_cli("datasets", "list", env=env).returncode == 0

    other_key = stack.admin("create-key", f"config-{secrets.token_hex(4)}")
    named = tmp_path / "elsewhere.toml"
    named.write_text(f'url = "{stack.url}/v1/"\napi_key = "{other_key}"\n')
    env = cli_env(HOME=str(home), PEERAID_CONFIG=str(named))
    mine = run_cli("jobs", "list", env=env)
    assert mine.returncode == 0 and mine.stdout.strip() == "ID  STATUS  DATASET  PRESET  PROGRESS  CREATED", "a fresh tenant's empty list"

    # the environment beats the file, the command line beats the environment
    assert run_cli("jobs", "list", env={**env, "PEERAID_API_KEY": "pk_0000_nonsense"}).returncode == 1
    assert run_cli("--api-key", other_key, "jobs", "list", env={**env, "PEERAID_API_KEY": "pk_0000_nonsense"}).returncode == 0

    broken = tmp_path / "broken.toml"
    broken.write_text("url = \n")
    result = run_cli("jobs", "list", env=cli_env(HOME=str(home), PEERAID_CONFIG=str(broken)))
    assert result.returncode == 1 and result.stderr.startswith(f"error: config file {broken}")


def test_uploading_a_name_twice_is_refused_naming_the_dataset_that_has_it(env, digits_file):
    first = run_cli("datasets", "upload", str(digits_file), "--name", "cli-twice", env=env)
    assert first.returncode == 0, first.stderr
    dataset_id = first.stdout.strip()
    again = run_cli("datasets", "upload", str(digits_file), "--name", "cli-twice", env=env)
    assert again.returncode == 1 and again.stdout == ""
    assert again.stderr.splitlines() == [
        f"error: you already have a dataset named 'cli-twice' ({dataset_id}): upload under another name, or delete that one first",
        f"hint: --name NEW_NAME, or `peeraid datasets delete {dataset_id}`",
    ], again.stderr


def test_api_keys_are_stripped_and_never_printed(env, api_key, tmp_path):
    secret = api_key.split("_", 2)[2]
    for padded in (f"{api_key}\n", f"{api_key} ", f"  {api_key}\r\n"):
        listed = run_cli("jobs", "list", env={**env, "PEERAID_API_KEY": padded})
        assert listed.returncode == 0 and listed.stdout.startswith("ID"), listed.stderr
    config = tmp_path / "padded.toml"
    config.write_text(f'url = "{env["PEERAID_URL"]}"\napi_key = "{api_key}\\n"\n')
    from_file = run_cli("jobs", "list", env={k: v for k, v in env.items() if k != "PEERAID_API_KEY"} | {"PEERAID_CONFIG": str(config)})
    assert from_file.returncode == 0, from_file.stderr

    refused = run_cli("jobs", "list", env={**env, "PEERAID_API_KEY": api_key[:-4] + "XXXX"})
    assert refused.returncode == 1 and secret[:-4] not in refused.stderr + refused.stdout
    prefix = api_key.split("_", 2)[1]
    assert refused.stderr.strip() == (
        f"error: the API key was refused (pk_{prefix}_…, from PEERAID_API_KEY): it is mistyped or was revoked; "
        f"check --api-key, PEERAID_API_KEY or api_key in {env['HOME']}/.config/peeraid/config.toml"
    ), refused.stderr

    broken = run_cli("jobs", "list", env={**env, "PEERAID_API_KEY": f"{api_key[:20]}\n{api_key[20:]}"})
    assert broken.returncode == 1 and "cannot reach" not in broken.stderr
    assert api_key[20:] not in broken.stderr and "PEERAID_API_KEY" in broken.stderr, broken.stderr
