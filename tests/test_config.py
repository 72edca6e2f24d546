"""Settings: every bad one stops start-up with one line naming it, .env is read and the real
environment wins, and every setting is documented."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import SETTINGS, Config, ConfigError
from app.domain.jobs import ExecutorType
from app.executors import load_executors
from app.main import create_app
from bench.processes import REPO_ROOT, ServerProcess
from tests.conftest import base_env


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TEST_MODE", "maybe"),
        ("LOGGING_LEVEL", "LOUD"),
        ("API_PORT", "eighty"),
        ("API_PORT", "70000"),
        ("SERVICES", "telegram"),
        ("SERVICES", "telegram:k1 telegram:k2"),
        ("GENERAL_PREMIUM_RATIO", "1"),
        ("GENERAL_PREMIUM_RATIO", "0 0"),
        ("GENERAL_PREMIUM_RATIO", "-1 3"),
        ("SAVE_IMAGES_LOCALLY", "2"),
        ("MAX_MESSAGE_BYTES", "0"),
        ("DEMO_DELAY_S", "nan"),
        ("PUBLIC_URL", "ftp://example"),
        ("S3_ENDPOINT", "localhost:9000"),
        ("DATABASE_PATH", ""),
    ],
)
def test_a_bad_setting_is_named(tmp_path, name, value):
    with pytest.raises(ConfigError) as error:
        Config.from_env(base_env(tmp_path, 8080, **{name: value}))
    assert str(error.value).startswith(f"{name}: ")


def test_a_key_is_never_echoed_in_the_error(tmp_path):
    with pytest.raises(ConfigError) as error:
        Config.from_env(base_env(tmp_path, 8080, SERVICES="telegram:sekret-key discord"))
    assert "sekret" not in str(error.value)


def test_no_services_outside_test_mode_is_an_error_and_test_mode_has_a_demo_key(tmp_path):
    with pytest.raises(ConfigError, match=r"^SERVICES: no services configured"):
        Config.from_env({"SERVICES": ""})
    assert Config.from_env({"TEST_MODE": "1"}).services == {"test": "demo-key"}


def test_defaults_are_local_and_embedded():
    config = Config.from_env({"TEST_MODE": "1"})
    assert config.api_host == "127.0.0.1"
    assert config.database_path == Path("data/devoid.sqlite3")
    assert config.executors_file == Path("data/executors.json")
    assert config.save_images_locally and config.general_premium_ratio == (1, 3)
    assert config.public_url == "http://127.0.0.1:8080"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (None, "does not exist (create it, or set TEST_MODE=1 to run demo backends)"),
        ("{not json", "is not readable JSON"),
        (json.dumps({"name": "x"}), "must hold a JSON list of backends"),
        (json.dumps([{"name": "a", "exec_type": "dalle", "endpoint": "http://h:1"}]), "has a bad entry"),
        (json.dumps([{"name": "a", "exec_type": "kandinsky", "endpoint": "not a url"}]), "has a bad entry"),
        (
            json.dumps(
                [
                    {"name": "a", "exec_type": "kandinsky", "endpoint": "http://h:1"},
                    {"name": "a", "exec_type": "kandinsky", "endpoint": "http://h:2"},
                ]
            ),
            "names a backend twice: a",
        ),
    ],
)
def test_a_bad_executors_file_is_named(tmp_path, content, reason):
    config = Config.from_env(base_env(tmp_path, 8080))
    if content is not None:
        config.executors_file.parent.mkdir(parents=True, exist_ok=True)
        config.executors_file.write_text(content)
    with pytest.raises(ConfigError) as error:
        create_app(config)
    assert str(error.value).startswith("EXECUTORS_FILE: ") and reason in str(error.value)


def test_the_original_executors_format_is_accepted(tmp_path):
    config = Config.from_env(base_env(tmp_path, 8080))
    config.executors_file.parent.mkdir(parents=True, exist_ok=True)
    config.executors_file.write_text(
        json.dumps(
            [
                {
                    "name": "sd-3060",
                    "gpu": "RTX 3060",
                    "timeout": 120,
                    "model": "sd15",
                    "exec_type": "automatic1111",
                    "endpoint": "http://10.0.0.5:7861/sdapi/v1",
                },
                {
                    "name": "kd-4090",
                    "gpu": "RTX 4090",
                    "timeout": 60,
                    "model": "kandinsky21",
                    "exec_type": "kandinsky",
                    "endpoint": "http://10.0.0.6:8000",
                    "comment": "extra keys are fine",
                },
            ]
        )
    )
    create_app(config)  # starts without complaint
    specs = load_executors(config.executors_file)
    assert [(spec.name, spec.exec_type, spec.endpoint, spec.timeout_s, spec.gpu) for spec in specs] == [
        ("sd-3060", ExecutorType.AUTOMATIC1111, "http://10.0.0.5:7861/sdapi/v1", 120, "RTX 3060"),
        ("kd-4090", ExecutorType.KANDINSKY, "http://10.0.0.6:8000", 60, "RTX 4090"),
    ]


async def run_to_exit(tmp_path: Path, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "app",
        cwd=tmp_path,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO_ROOT), **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(20):
        _, stderr = await process.communicate()
    return process.returncode, stderr.decode()


async def test_an_unusable_image_url_secret_stops_start_up_with_one_line(tmp_path):
    (tmp_path / "devoid.sqlite3.image-url-secret").mkdir()  # where the secret file would go
    code, stderr = await run_to_exit(
        tmp_path, {"TEST_MODE": "1", "API_PORT": "0", "DATABASE_PATH": str(tmp_path / "devoid.sqlite3")}
    )
    assert code == 2
    [line] = stderr.strip().splitlines()
    assert line.startswith("devoid: cannot start: the image URL secret") and "IMAGE_URL_SECRET" in line


async def test_python_m_app_stops_with_one_line_naming_the_setting(tmp_path):
    code, stderr = await run_to_exit(tmp_path, {"TEST_MODE": "1", "API_PORT": "eighty"})
    assert code == 2
    assert stderr.strip().splitlines() == [
        "devoid: cannot start: API_PORT: expected a port number 0-65535, got 'eighty'"
    ]


async def test_dotenv_is_read_and_the_real_environment_wins(tmp_path, unused_tcp_port_factory):
    (tmp_path / ".env").write_text("TEST_MODE=1\nLOGGING_LEVEL=LOUD\n")
    code, stderr = await run_to_exit(tmp_path, {})
    assert code == 2 and "LOGGING_LEVEL" in stderr  # the .env value was read

    port = unused_tcp_port_factory()
    server = ServerProcess(
        {"LOGGING_LEVEL": "DEBUG", "API_PORT": str(port), "DEMO_DELAY_S": "0"}, tmp_path / "server.log", cwd=tmp_path
    )
    await server.start()  # LOGGING_LEVEL from the environment overrides the .env's bad one
    await server.stop()
    assert "TEST_MODE=1: using demo backends" in server.log()
    assert " DEBUG " in server.log()


def test_the_settings_docs_are_current_and_the_generator_writes_only_when_asked():
    check = subprocess.run(
        [sys.executable, "-m", "app.config", "--check"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout
    before = (REPO_ROOT / "README.md").stat().st_mtime_ns
    shown = subprocess.run([sys.executable, "-m", "app.config"], cwd=REPO_ROOT, capture_output=True, text=True)
    assert shown.stdout.startswith("| setting | default | meaning |")
    assert (REPO_ROOT / "README.md").stat().st_mtime_ns == before


def test_every_setting_is_documented_in_readme_and_env_example():
    readme = (REPO_ROOT / "README.md").read_text()
    env_example = (REPO_ROOT / ".env.example").read_text()
    for setting in SETTINGS:
        assert f"`{setting.env_name}`" in readme, setting.env_name
        assert f"\n{setting.env_name}=" in env_example or f"\n# {setting.env_name}=" in env_example, setting.env_name
