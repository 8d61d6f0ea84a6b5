"""Ray tasks get the driver's cloud credentials (issue 16: NoCredentialsError on workers)."""

from __future__ import annotations

from pathlib import Path

import pytest

from clients.augment import worker_environment


def test_credential_variables_of_the_driver_are_forwarded() -> None:
    environ = {"AWS_ACCESS_KEY_ID": "AKIA", "AWS_SECRET_ACCESS_KEY": "s", "AWS_REGION": "eu-west-1",
               "GOOGLE_APPLICATION_CREDENTIALS": "/k.json", "HOME": "/root", "PATH": "/bin"}
    env = worker_environment("s3://bucket/prefix", None, environ)
    assert env == {key: value for key, value in environ.items() if key not in ("HOME", "PATH")}


def test_profile_credentials_are_resolved_on_the_driver(tmp_path: Path) -> None:
    pytest.importorskip("botocore")
    credentials = tmp_path / "credentials"
    credentials.write_text("[team]\naws_access_key_id = AKIATEAM\naws_secret_access_key = secret-team\n")
    environ = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials), "AWS_CONFIG_FILE": str(tmp_path / "none"),
               "AWS_PROFILE": "team"}
    with pytest.MonkeyPatch.context() as patch:
        for key, value in environ.items():  # botocore reads os.environ for its file locations
            patch.setenv(key, value)
        patch.delenv("AWS_ACCESS_KEY_ID", raising=False)
        patch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
        env = worker_environment("s3://bucket/x", None, environ)
    assert env["AWS_ACCESS_KEY_ID"] == "AKIATEAM" and env["AWS_SECRET_ACCESS_KEY"] == "secret-team"
    assert "AWS_PROFILE" not in env  # the profile file is not on the workers


def test_explicit_keys_and_local_paths_resolve_nothing(tmp_path: Path) -> None:
    assert worker_environment(str(tmp_path), None, {}) == {}
    assert worker_environment("s3://b/x", {"key": "k", "secret": "s"}, {}) == {}
    assert worker_environment("s3://b/x", None, {}, resolve_aws=False) == {}
