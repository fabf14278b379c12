"""benchmarks/harness.py: the order it calls variants in and what it keeps (no timing
is asserted)."""

from __future__ import annotations

import json

from benchmarks.harness import Result, compare, machine_line, report


def test_warm_up_first_then_alternating_rounds():
    calls = []
    variants = {name: (lambda name=name: calls.append(name) or 4) for name in ("a", "b", "c")}
    results = compare(variants, rounds=3, warmup=2)
    assert calls == ["a", "a", "b", "b", "c", "c"] + ["a", "b", "c"] * 3
    assert all(r.items == [4.0] * 3 and len(r.seconds) == 3 for r in results.values())


def test_rate_is_the_median_of_items_per_second():
    result = Result(seconds=[1.0, 2.0, 4.0], items=[10.0, 10.0, 10.0])
    assert result.median_s == 2.0 and result.rate == 5.0


def test_report_writes_ratios_and_the_machine(tmp_path, capsys):
    results = {"ours": Result([1.0, 1.0], [6.0, 6.0]), "base": Result([1.0, 1.0], [2.0, 2.0])}
    out = report(results, "pairs/s", baseline="base", json_path=str(tmp_path / "r.json"),
                 args={"rounds": 2})
    written = json.loads((tmp_path / "r.json").read_text())
    assert written == json.loads(json.dumps(out))
    assert written["results"]["ours"]["ratio"] == 3.0 and written["args"] == {"rounds": 2}
    assert capsys.readouterr().out.startswith(machine_line(written["machine"]).split(";")[0])
