"""Offline tools killed mid-write leave the previous complete file, or nothing that loads."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

import sedac_probes
from sedac_probes import ProbeFileError


def run_killed(code: str) -> None:
    """Run ``code`` in a fresh Python process and check that it died of SIGKILL (the kill is part of it)."""
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)
    assert out.returncode == -signal.SIGKILL, (out.returncode, out.stderr[-2000:])


SAVE = """
    import os, signal, torch
    from pathlib import Path
    from sedac_probes import LREProbe, ProbeBank, io

    def bank(seed):
        torch.manual_seed(seed)
        return ProbeBank.from_probes({{1: LREProbe(16, 4, "safety"), 3: LREProbe(16, 4, "safety")}})

    d = Path({dir!r})
    io.save(d, bank(0), {{"note": "first"}})
    real = io._atomic_write

    def dying(path, write):
        if path.name == {victim!r}:
            {how}
        real(path, write)

    io._atomic_write = dying
    io.save(d, bank(1), {{"note": "second"}})
"""
KILL = "os.kill(os.getpid(), signal.SIGKILL)"
HALF_THEN_KILL = ("write(path.with_name(path.name + '.tmp')); "
                  "tmp = path.with_name(path.name + '.tmp'); tmp.write_bytes(tmp.read_bytes()[:100]); " + KILL)


def test_a_save_killed_before_the_metadata_refuses_to_load(tmp_path):
    """New weights are in place, the metadata is the old one: loading must fail, naming the mismatch (before
    the digest, the old thresholds would have been served with the new probes)."""
    d = tmp_path / "probes"
    run_killed(SAVE.format(dir=str(d), victim="sedac_probes.json", how=KILL))
    assert json.loads((d / "sedac_probes.json").read_text())["note"] == "first"
    with pytest.raises(ProbeFileError, match="is not the weights .* was written with .*interrupted"):
        sedac_probes.load(d)


@pytest.mark.parametrize("victim", ["probes.safetensors", "sedac_probes.json"])
def test_a_save_killed_while_writing_a_file_leaves_the_previous_one(tmp_path, victim):
    """Killed with half a temporary file written: the directory still holds the first save, which loads."""
    d = tmp_path / "probes"
    run_killed(SAVE.format(dir=str(d), victim=victim, how=HALF_THEN_KILL))
    assert (d / (victim + ".tmp")).exists()  # the partial write is there, under a name nothing reads
    if victim == "probes.safetensors":
        loaded = sedac_probes.load(d)
        assert loaded.meta["note"] == "first"
    else:  # weights already replaced by the second save, metadata still the first's: refused
        with pytest.raises(ProbeFileError, match="interrupted"):
            sedac_probes.load(d)


def test_calibrate_killed_while_writing_the_config_leaves_the_previous_one(tmp_path):
    """`sedac-monitor calibrate` writes sedac_config.json through a temporary file: killed half-way through
    that write, the previous config is intact."""
    from sedac_monitor.calibrate import write_config

    out = tmp_path / "sedac_config.json"
    write_config({"format": "sedac_config", "tau": 0.99, "note": "first"}, out)
    code = f"""
        import os, signal
        from pathlib import Path
        from sedac_monitor.calibrate import write_config
        real = Path.write_text

        def dying(self, text, *a, **k):
            real(self, text[: len(text) // 2])
            os.kill(os.getpid(), signal.SIGKILL)

        Path.write_text = dying
        write_config({{"format": "sedac_config", "tau": 0.5, "note": "second"}}, {str(out)!r})
    """
    run_killed(code)
    assert json.loads(out.read_text())["note"] == "first"
    assert os.path.exists(str(out) + ".tmp")
