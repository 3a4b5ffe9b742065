from __future__ import annotations

from pathlib import Path

import pytest

from edgetrust.settings import Settings, SettingsError, load_settings, setting_fields
from tests.conftest import REPO_ROOT


def test_defaults_need_no_configuration(tmp_path: Path) -> None:
    settings = load_settings(environ={"XDG_DATA_HOME": str(tmp_path)})

    assert settings.data_dir == tmp_path / "edgetrust"
    assert settings.effective_database_url == f"sqlite:///{tmp_path / 'edgetrust' / 'edgetrust.db'}"
    assert settings.effective_ek_ca_dir == tmp_path / "edgetrust" / "ek-ca"
    assert settings.listen_host == "127.0.0.1"


def test_environment_overrides_file(tmp_path: Path) -> None:
    config = tmp_path / "edgetrust.toml"
    config.write_text('listen_port = 9000\nlog_level = "DEBUG"\nak_allowed_algorithms = ["ecdsa-sha256"]\n')

    settings = load_settings(config, environ={"EDGETRUST_LISTEN_PORT": "9100"})

    assert settings.listen_port == 9100
    assert settings.log_level == "DEBUG"
    assert settings.ak_allowed_algorithms == ["ecdsa-sha256"]


def test_environment_lists_booleans_paths(tmp_path: Path) -> None:
    settings = load_settings(environ={
        "EDGETRUST_AK_ALLOWED_ALGORITHMS": "rsassa-sha256, ecdsa-sha256",
        "EDGETRUST_REQUIRE_EK_CERTIFICATE": "false",
        "EDGETRUST_EK_CA_DIR": str(tmp_path / "ca"),
    })

    assert settings.ak_allowed_algorithms == ["rsassa-sha256", "ecdsa-sha256"]
    assert settings.require_ek_certificate is False
    assert settings.effective_ek_ca_dir == tmp_path / "ca"


def test_config_path_from_environment(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("listen_port = 7000\n")

    settings = load_settings(environ={"EDGETRUST_CONFIG": str(config)})

    assert settings.listen_port == 7000


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("listen_prot = 1\n", "unknown key(s) listen_prot"),
        ("listen_port = 'x'\n", "setting listen_port (EDGETRUST_LISTEN_PORT) has invalid value 'x'"),
        ("require_ek_certificate = 'yes'\n", "expected true or false"),
        ("listen_port = \n", "is not valid TOML"),
    ],
)
def test_bad_config_file_names_key(tmp_path: Path, content: str, message: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(content)

    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_settings(config, environ={})


def test_bad_environment_boolean() -> None:
    with pytest.raises(SettingsError, match="EDGETRUST_REQUIRE_EK_CERTIFICATE='maybe' is not a boolean"):
        load_settings(environ={"EDGETRUST_REQUIRE_EK_CERTIFICATE": "maybe"})


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="cannot read configuration file"):
        load_settings(tmp_path / "absent.toml", environ={})


def test_every_setting_documented() -> None:
    page = (REPO_ROOT / "docs" / "configuration.md").read_text()

    for setting in setting_fields():
        assert f"| `{setting.name}` |" in page, f"{setting.name} missing from docs/configuration.md"
        assert setting.metadata.get("help"), f"{setting.name} has no help text"


def test_settings_are_frozen() -> None:
    settings = Settings()

    with pytest.raises(AttributeError):
        settings.listen_port = 1  # type: ignore[misc]
