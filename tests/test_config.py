from pathlib import Path

import pytest

from formation_vmm import config

pytestmark = pytest.mark.pure


def test_defaults_are_those_of_the_replaced_service(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("VMM_"):
            monkeypatch.delenv(key)
    s = config.load()
    assert s.api_port == 3003
    assert s.vm_dir == Path("/run/form-vm")
    assert s.images_dir == Path("/var/lib/formation/vm-images")
    assert s.domain_type == "kvm"


def test_file_then_env_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "vmm.yaml"
    path.write_text("api_port: 5000\nvm_dir: /from/file\nlog_level: DEBUG\nlibvirt_uri: test:///file\n")
    monkeypatch.setenv("VMM_CONFIG_PATH", str(path))
    monkeypatch.setenv("VMM_API_PORT", "4000")
    monkeypatch.setenv("VMM_LIBVIRT_URI", "test:///env")
    s = config.load({"libvirt_uri": "test:///flag", "domain_type": None})
    assert s.vm_dir == Path("/from/file")  # file only
    assert s.log_level == "DEBUG"
    assert s.api_port == 4000  # env beats file
    assert s.libvirt_uri == "test:///flag"  # flag beats env


def test_bad_values_are_refused_with_the_setting_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMM_API_PORT", "not-a-port")
    with pytest.raises(ValueError, match="api_port"):
        config.load()


def test_quantities_are_read_at_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMM_RESERVED_MEMORY", "2Gi")
    assert config.load().reserved_memory == 2 << 30
    monkeypatch.setenv("VMM_RESERVED_MEMORY", "two gigs")
    with pytest.raises(ValueError, match="reserved_memory"):
        config.load()


def test_wait_for_is_the_replaced_services_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WAIT_FOR", "127.0.0.1:6443, db.local:5432")
    assert config.load().wait_for == ["127.0.0.1:6443", "db.local:5432"]
    monkeypatch.setenv("WAIT_FOR", "no-port-here")
    with pytest.raises(ValueError, match="is not host:port"):
        config.load()


def test_the_old_state_url_is_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMM_STATE_URL", "http://state:8080")
    assert config.load().state_url == "http://state:8080"


def test_a_missing_config_file_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("VMM_CONFIG_PATH", str(tmp_path / "absent.yaml"))
    with pytest.raises(ValueError, match=r"absent\.yaml does not exist"):
        config.load()


def test_every_setting_is_documented() -> None:
    documented = (Path(__file__).parents[1] / "docs" / "configuration.md").read_text()
    missing = [name for name in config.Settings.model_fields if f"| `{name}` |" not in documented]
    assert missing == [], f"docs/configuration.md has no row for {missing}"
