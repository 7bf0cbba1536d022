import pytest
from hypothesis import given
from hypothesis import strategies as st

from simulator.specs import units
from simulator.specs.units import UnitError, parse_quantity


@pytest.mark.parametrize(
    ("text", "dimension", "expected"),
    [
        ("3.35 TB/s", units.BANDWIDTH, 3.35e12),
        ("900 GB/s", units.BANDWIDTH, 9e11),
        ("400 Gbit/s", units.BANDWIDTH, 5e10),
        ("989.5 TFLOPS", units.FLOPS, 989.5e12),
        ("1979 TOPS", units.FLOPS, 1.979e15),
        ("80 GiB", units.BYTES, 80 * 2**30),
        ("80 GB", units.BYTES, 80e9),
        ("50 MiB", units.BYTES, 50 * 2**20),
        ("700 W", units.POWER, 700.0),
        ("2 us", units.TIME, 2e-6),
        ("500 ns", units.TIME, 5e-7),
        ("1.98 GHz", units.FREQUENCY, 1.98e9),
        ("0.5 pJ", units.ENERGY, 0.5e-12),
        ("1e3 GB/s", units.BANDWIDTH, 1e12),
    ],
)
def test_parses_quantities_into_si(text, dimension, expected):
    assert parse_quantity(text, dimension) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("text", "dimension", "fragment"),
    [
        ("3.35 TB", units.BANDWIDTH, "unknown bandwidth unit 'TB'"),
        ("3.35 TBps", units.BANDWIDTH, "unknown bandwidth unit"),
        ("80", units.BYTES, "has no unit"),
        (80, units.BYTES, "has no unit"),
        ("fast", units.BANDWIDTH, "cannot read"),
        ("700 Watts", units.POWER, "unknown power unit"),
        (None, units.TIME, "expected a time"),
    ],
)
def test_rejects_bad_units_with_an_example(text, dimension, fragment):
    with pytest.raises(UnitError, match=fragment) as err:
        parse_quantity(text, dimension)
    assert dimension.example in str(err.value)


@given(st.floats(min_value=1e-3, max_value=1e6), st.sampled_from(["", "k", "M", "G", "T"]))
def test_prefixes_scale_by_powers_of_1000(value, prefix):
    factor = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}[prefix]
    parsed = parse_quantity(f"{value!r} {prefix}B/s", units.BANDWIDTH)
    assert parsed == pytest.approx(value * factor, rel=1e-12)


def test_format_round_trips_through_parse():
    for value in (3.35e12, 2.039e12, 1.5e9, 640.0):
        text = units.format_quantity(value, "B/s")
        assert parse_quantity(text, units.BANDWIDTH) == pytest.approx(value, rel=1e-2)
