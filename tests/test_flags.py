"""Yes/no settings: one reading for every bundle switch and environment variable."""

from __future__ import annotations

import pytest

from custom_nets.errors import InputError
from custom_nets.flags import as_flag, env_flag


@pytest.mark.parametrize("value", [True, 1, "1", "true", "True", "YES", " on "])
def test_on(value):
    assert as_flag(value) is True


@pytest.mark.parametrize("value", [False, 0, None, "0", "false", "False", "no", "OFF"])
def test_off(value):
    assert as_flag(value) is False


@pytest.mark.parametrize("value", ["ture", "2", 2, "", "maybe"])
def test_anything_else_is_refused_naming_the_switch(value):
    with pytest.raises(InputError, match=rf"^--skip_existing must be true or false, got {value!r}$"):
        as_flag(value, "skip_existing")


def test_env_flag(monkeypatch):
    monkeypatch.setenv("CUSTOM_NETS_TEST_FLAG", "Yes")
    assert env_flag("CUSTOM_NETS_TEST_FLAG")
    monkeypatch.setenv("CUSTOM_NETS_TEST_FLAG", "0")
    assert not env_flag("CUSTOM_NETS_TEST_FLAG")
    monkeypatch.delenv("CUSTOM_NETS_TEST_FLAG")
    assert not env_flag("CUSTOM_NETS_TEST_FLAG")
