"""Sizes (units.parse_size / format_size) and the sysctl-like machine settings."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

import copyengine as ce
from copyengine.settings import MIGRATE_MODES, SETTINGS
from copyengine.units import format_size, parse_size


# ----------------------------------------------------------------------------- units
@pytest.mark.parametrize("text,expected", [
    ("4KiB", 4096), ("64KiB", 65536), ("2MiB", 2 << 20), ("1GiB", 1 << 30), ("32GiB", 32 << 30),
    ("1TiB", 1 << 40), ("4096", 4096), ("4096B", 4096), ("4096b", 4096), ("4kib", 4096),
    ("2mib", 2 << 20), (" 2 MiB ", 2 << 20), ("4 KiB", 4096),
    (4096, 4096), (2 << 20, 2 << 20), (np.int64(65536), 65536),
])
def test_parse_size_accepts(text, expected):
    n = parse_size(text)
    assert n == expected
    assert type(n) is int


@pytest.mark.parametrize("bad", ["", "KiB", "4KB", "4kb", "4K", "4 MB", "1.5MiB", "-4KiB", "4KiB4",
                                 "0", "0KiB", "four", "4 Ki B", "0x1000", 0, -1, -4096])
def test_parse_size_rejects_values(bad):
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("bad", [None, 4096.0, 1.5, True, False, b"4KiB", [4096], {"n": 1}])
def test_parse_size_rejects_types(bad):
    with pytest.raises(TypeError):
        parse_size(bad)


def test_parse_size_names_what_in_message():
    with pytest.raises(ValueError, match="node_size"):
        parse_size("lots", "node_size")
    with pytest.raises(TypeError, match="page_size"):
        parse_size(1.0, "page_size")


@given(st.integers(min_value=1, max_value=1 << 50))
def test_format_then_parse_round_trips(n):
    assert parse_size(format_size(n)) == n


@pytest.mark.parametrize("n,text", [(4096, "4KiB"), (65536, "64KiB"), (2 << 20, "2MiB"),
                                    (1 << 30, "1GiB"), (4097, "4097B"), (3 << 10, "3KiB")])
def test_format_size(n, text):
    assert format_size(n) == text


# ----------------------------------------------------------------------------- settings
def test_settings_defaults(machine):
    s = machine.settings
    assert s["nr_max_batched_migration"] == 512          # HPAGE_PMD_NR with 4 KiB pages
    assert s["migrate_mode"] == "sync"
    assert s["migration_wait_timeout"] > 0
    assert s["copy_timeout"] > 0
    assert set(s) == set(SETTINGS)
    assert set(s.as_dict()) == set(SETTINGS)
    assert set(s.describe()) == set(SETTINGS)
    assert all(isinstance(d, str) and d for d in s.describe().values())


def test_batch_default_with_64k_pages(machine64k):
    # DESIGN: NR_MAX_BATCHED_MIGRATION is HPAGE_PMD_NR: 8192 with 64 KiB base pages (arm64).
    assert machine64k.settings["nr_max_batched_migration"] == 8192
    machine64k.settings["nr_max_batched_migration"] = 8192   # the default is a valid value
    machine64k.settings["nr_max_batched_migration"] = 32
    assert machine64k.settings["nr_max_batched_migration"] == 32


def test_settings_write_read_item_and_attribute(machine):
    s = machine.settings
    s["nr_max_batched_migration"] = 64
    assert s["nr_max_batched_migration"] == 64 and s.nr_max_batched_migration == 64
    s.migrate_mode = "async"
    assert s["migrate_mode"] == "async"
    for mode in MIGRATE_MODES:
        s["migrate_mode"] = mode
        assert s.migrate_mode == mode
    s["migration_wait_timeout"] = 1
    assert s["migration_wait_timeout"] == 1.0 and type(s["migration_wait_timeout"]) is float
    s["copy_timeout"] = 0.5
    assert s.copy_timeout == 0.5
    s["nr_max_batched_migration"] = np.int32(7)
    assert s["nr_max_batched_migration"] == 7 and type(s["nr_max_batched_migration"]) is int
    s["nr_max_batched_migration"] = machine.total_frames      # upper bound is allowed
    assert s.as_dict()["nr_max_batched_migration"] == machine.total_frames


def test_settings_are_per_machine():
    with ce.Machine(nodes=1, node_size="2MiB") as a, ce.Machine(nodes=1, node_size="2MiB") as b:
        a.settings["migrate_mode"] = "async"
        assert b.settings["migrate_mode"] == "sync"


BAD_SETTINGS = [
    # (name, value, exception)
    ("no_such_setting", 1, ValueError),
    ("", 1, ValueError),
    ("NR_MAX_BATCHED_MIGRATION", 1, ValueError),
    (1, 1, TypeError),
    (None, 1, TypeError),
    ("nr_max_batched_migration", 0, ValueError),
    ("nr_max_batched_migration", -5, ValueError),
    ("nr_max_batched_migration", 1 << 40, ValueError),
    ("nr_max_batched_migration", True, TypeError),
    ("nr_max_batched_migration", 1.0, TypeError),
    ("nr_max_batched_migration", "512", TypeError),
    ("nr_max_batched_migration", None, TypeError),
    ("migrate_mode", "SYNC", ValueError),
    ("migrate_mode", "fast", ValueError),
    ("migrate_mode", "", ValueError),
    ("migrate_mode", 1, TypeError),
    ("migrate_mode", None, TypeError),
    ("migration_wait_timeout", 0, ValueError),
    ("migration_wait_timeout", -1, ValueError),
    ("migration_wait_timeout", 3601, ValueError),
    ("migration_wait_timeout", math.nan, ValueError),
    ("migration_wait_timeout", math.inf, ValueError),
    ("migration_wait_timeout", "1", TypeError),
    ("migration_wait_timeout", True, TypeError),
    ("migration_wait_timeout", None, TypeError),
    ("copy_timeout", 0.0, ValueError),
    ("copy_timeout", -0.1, ValueError),
    ("copy_timeout", [1], TypeError),
]


@pytest.mark.parametrize("name,value,exc", BAD_SETTINGS)
def test_bad_settings_raise_and_change_nothing(machine, name, value, exc):
    s = machine.settings
    s["migrate_mode"] = "sync_light"       # a non-default state to preserve
    s["nr_max_batched_migration"] = 100
    before = s.as_dict()
    with pytest.raises(exc):
        s[name] = value
    assert s.as_dict() == before
    if isinstance(name, str) and name.isidentifier():
        with pytest.raises((exc, AttributeError)):
            setattr(s, name, value)
        assert s.as_dict() == before


@pytest.mark.parametrize("name,exc", [("nope", ValueError), (3, TypeError)])
def test_reading_unknown_setting(machine, name, exc):
    with pytest.raises(exc):
        machine.settings[name]


def test_unknown_attribute_is_attribute_error(machine):
    with pytest.raises(AttributeError):
        machine.settings.nope
    assert not hasattr(machine.settings, "_private_thing")
    assert getattr(machine.settings, "nope", "dflt") == "dflt"


def test_settings_as_dict_is_a_copy(machine):
    d = machine.settings.as_dict()
    d["migrate_mode"] = "bogus"
    assert machine.settings["migrate_mode"] == "sync"


@given(st.one_of(st.integers(), st.floats(allow_nan=True), st.text(max_size=8), st.none(),
                 st.booleans()))
def test_settings_fuzz_validation(value):
    with ce.Machine(nodes=1, node_size="2MiB") as m:
        s = m.settings
        for name in SETTINGS:
            before = s.as_dict()
            try:
                s[name] = value
            except (ValueError, TypeError):
                assert s.as_dict() == before
            else:
                stored = s[name]
                if name == "nr_max_batched_migration":
                    assert type(stored) is int and 1 <= stored
                elif name == "migrate_mode":
                    assert stored in MIGRATE_MODES
                elif name == "offload_reasons":
                    assert type(stored) is int and 0 <= stored < 1 << 10
                else:
                    assert type(stored) is float and 0 < stored <= 3600
