"""``python -m nystrom.experiments.landmark_report cost``: its table, from made-up timings (the real part takes a
minute)."""

from nystrom.experiments import landmark_report


def test_the_cost_table_judges_unrounded_values(monkeypatch, capsys):
    # A review: shares were rounded to two digits before anyone read them, so 8.36 / 33.34 = 0.2507 printed as 0.25,
    # the bound "met". The table prints three digits and judges the unrounded ratio and share.
    times = {1: (16000.0, 44.16, 55.42, 41.02, 10.88), 2: (7900.0, 25.7, 33.34, 22.67, 8.36)}
    names = ("exact SDPA", "uniform", "norm", "given landmarks", "norm selection")
    monkeypatch.setattr(landmark_report, "cost", lambda threads: dict(zip(names, times[min(threads, 2)])))
    monkeypatch.setattr(landmark_report.os, "cpu_count", lambda: 2)
    assert landmark_report.main(["cost"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("| 1 |", "| 2 |"))]
    assert rows[0].endswith("| 1.255 | 0.196 | met |")
    assert rows[1].endswith("| 1.297 | 0.251 | missed |")
