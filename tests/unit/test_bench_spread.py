"""bench.spread: the min / median / max of several bench reports, each figure on its own."""

from __future__ import annotations

from typing import Any

from bench import spread


def _report(router_us: float, rate: float, *, idle: float | None = 0.09) -> dict[str, Any]:
    rep: dict[str, Any] = {
        "router": {
            "saturation": {"best": {"rate": rate, "cpu_us_per_transfer": {"router": router_us}}},
            "overload": {"runs": {"150%": {"goodput_fraction": 0.9}}},
        },
        "load_average": {"before": [1.5, 1.0, 0.5], "after": [3.0, 2.0, 1.0]},
    }
    if idle is not None:
        rep["idle"] = {"cores_total": idle}
    return rep


def test_each_figure_spreads_on_its_own_and_a_missing_one_is_not_zero() -> None:
    sp = spread.spread(
        [_report(300, 900), _report(200, 1500, idle=None), _report(250, 1000, idle=0.11)]
    )
    f = sp["figures"]
    assert sp["runs"] == 3
    router = f["router CPU per transfer at saturation"]
    assert (router["min"], router["median"], router["max"]) == (200, 250, 300)
    # The fastest run is not the cheapest one: each figure is read on its own.
    sat = f["router saturation"]
    assert (sat["min"], sat["median"], sat["max"]) == (900, 1000, 1500)
    idle = f["idle cluster"]
    assert idle["values"] == [0.09, None, 0.11]
    assert (idle["min"], idle["median"], idle["max"]) == (0.09, 0.1, 0.11)
    assert f["load average before (1 min)"]["median"] == 1.5
    # A figure no report has is listed without numbers.
    assert "min" not in f["batch endpoint"]
    text = spread.table(sp)
    assert "| router CPU per transfer at saturation, us | 200 | 250 | 300 |" in text
    assert "| batch endpoint, transfers/s | - | - | - |" in text


def test_a_boolean_or_text_is_not_read_as_a_number() -> None:
    rep = _report(100, 100)
    rep["router"]["saturation"]["best"]["rate"] = True
    rep["router"]["overload"]["runs"]["150%"]["goodput_fraction"] = "0.9"
    f = spread.spread([rep])["figures"]
    assert "min" not in f["router saturation"]
    assert "min" not in f["150 %: goodput / saturation"]
