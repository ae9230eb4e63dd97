"""Every config in conf/ composes, and the job-level checks reject bad settings before any model load."""

import pytest
from omegaconf import OmegaConf

from mtp.cli import choices
from mtp.errors import ConfigError
from mtp.runner import build_drafter, validate

from .conftest import compose_cfg


@pytest.mark.parametrize("group", ["model", "method", "task"])
def test_every_config_composes(group):
    for name in choices(group):
        cfg = compose_cfg([f"{group}={name}"])
        OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
        assert cfg[group].name == name


def test_every_method_builds_at_its_default_bc():
    for name in choices("method"):
        cfg = compose_cfg([f"method={name}"])
        assert build_drafter(cfg).min_bc <= cfg.bc


@pytest.mark.parametrize("override,message", [
    ("max_new_tokens=0", "max_new_tokens=0 must be > 0"),
    ("bc=0", "must be >= 1"),
    ("temperature=-1", "must be a number >= 0"),
    ("bc=abc", "must be an integer"),
])
def test_bad_settings_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_cfg([override]))
