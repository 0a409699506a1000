"""sedac-bench load without a server: its prompts, its report and its argument checks (the server part
runs in sedac-vllm's tests/test_server.py, the same checks at a bounded load)."""

import os
from pathlib import Path

import pytest

from sedac_bench import load_bench
from sedac_bench.cli import main


def test_prompts_are_distinct_real_text_of_varied_length():
    root = Path(os.environ.get("SEDAC_ASSETS") or "")
    assert (root / "text").is_dir(), "SEDAC_ASSETS is not set to built assets: run the suite through `nox -s tests`"
    ps = load_bench.prompts(root, 1024)
    assert len(ps) == len(set(ps)) == 1024
    words = [len(p.split()) for p in ps]
    assert min(words) >= 8 and max(words) >= 60
    assert sum(p.count(" the ") for p in ps) > 500  # prose, not noise


def result(lost=0, stopped=True):
    return {"command": "sedac-bench load", "config": "/x/sedac_config.json", "startup_s": 80.0,
            "machine": {"cpu_model": "CPU", "cpu_count": 2}, "requests": 4, "malformed": 2, "concurrency": 4,
            "max_tokens": 8, "load_wall_s": 1.5,
            "load": {"requests": 6, "lost": lost, "good_answered": 4 - lost,
                     "by_kind": {"good": {"answered": 4 - lost, **({"lost": lost} if lost else {})},
                                 "empty prompt": {"4xx": 1}, "unknown model": {"4xx": 1}},
                     "latency_s": {"p50": 0.5, "p99": 0.9, "max": 1.0}},
            "malformed_without_message": 0,
            "counters": {"vllm requests succeeded = good requests answered": {"metrics": 4.0, "expected": 4,
                                                                              "pass": True},
                         "SEDAC tokens = tokens forwarded": {"metrics": 90.0, "expected": 91, "pass": False}},
            "alone": {"checked": 2, "equal": 2},
            "sigterm": {"requests": 4, "by_kind": {"good": {"answered": 3, "5xx": 1}}, "lost": 0,
                        "good_answered": 3, "latency_s": {"p50": 1.0, "p99": 2.0, "max": 2.0},
                        "stopped_s": 12.5, "stopped": stopped}}


def test_report_lines_say_what_happened():
    text = "\n".join(load_bench.report_lines(result()))
    assert "4 completions of 8 tokens and 2 malformed requests, 4 at a time" in text
    assert "P50 0.50 s, P99 0.90 s" in text and "**lost 0**" in text
    assert "| empty prompt | 0 | 1 | 0 | 0 |" in text
    assert "| SEDAC tokens = tokens forwarded | 90.0 | 91 | DIFFERS |" in text
    assert "2 of 2 sampled outputs equal" in text
    assert "4 requests in flight: 3 answered, 1 5xx; the server stopped 12.5 s after" in text
    r = result()
    r["sigterm"].update(refused=1, short=1, cut_off=0)
    assert ("3 answered, 1 5xx (of the answered, 1 cut short) (of the 5xx, 1 refused with 503 before they "
            "started") in "\n".join(load_bench.report_lines(r))
    r["sigterm"].update(refused=0, short=0, cut_off=1)
    assert "(of the 5xx, 1 answered with 503 when the shutdown timeout ran out" in "\n".join(load_bench.report_lines(r))
    bad = "\n".join(load_bench.report_lines(result(lost=1, stopped=False)))
    assert "**lost 1**" in bad and "had NOT stopped" in bad and "| good | 3 | 0 | 0 | 1 |" in bad


@pytest.mark.parametrize("flag", ["--requests=0", "--concurrency=0", "--max-tokens=0", "--alone=-1"])
def test_load_refuses_nonsense_counts(flag, tmp_path, capsys):
    assert main(["load", "--out", str(tmp_path), flag]) == 2
    assert "must be at least" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--prompts=0", "--each=0", "--tolerance=0", "--tolerance=1.5"])
def test_online_refuses_nonsense_settings(flag, tmp_path, capsys):
    assert main(["online", "--out", str(tmp_path), flag]) == 2
    assert "must be at least 1" in capsys.readouterr().err
