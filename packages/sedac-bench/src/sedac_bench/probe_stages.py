"""The probe stage of :class:`~sedac_bench.run.Bench`: V6 probe data on the calibration and held-out texts,
training, calibration and held-out metrics (the full size adds the fused gate and the presets)."""

from __future__ import annotations

from .metrics import MAX_RISK
from .stages import BenchState


class ProbeStages(BenchState):
    """A mixin of :class:`~sedac_bench.run.Bench`: it reads the bench's model, texts, size and results."""

    def train_probes(self) -> None:
        from sedac_probes.calibrate import calibrate as calibrate_probes
        from sedac_probes.collect import collect
        from sedac_probes.evaluate import evaluate as evaluate_probes
        from sedac_probes.io import load
        from sedac_probes.train import train

        mt = (self.model, self.tok)
        with self.timed("probe data (enwiki train, lee_news held out)"):
            collect(self.model_dir, self.texts["enwiki"], self.work / "probe-data-enwiki", "7,14,21",
                    self.size["probe_windows"], 512, log=self.log, model_and_tokenizer=mt)
            collect(self.model_dir, self.texts["lee_news"], self.work / "probe-data-news", "7,14,21",
                    self.size["eval_windows"], 512, log=self.log, model_and_tokenizer=mt)
        self.probes = {}
        report = {}
        with self.timed("probe training and calibration"):
            for target in self.size["probe_targets"]:
                d = self.out / f"probes-{target}"
                train(self.work / "probe-data-enwiki", d, target, log=self.log)
                ev = calibrate_probes(d, self.work / "probe-data-enwiki", max_risk=MAX_RISK, log=self.log,
                                      model_and_tokenizer=mt)
                held = evaluate_probes(d, self.work / "probe-data-news", log=self.log)
                self.probes[target] = load(d)
                report[target] = {"calibration": ev, "heldout_metrics": held,
                                  "training": self.probes[target].meta["training"]["per_layer"]}
            if not self.size["extras"]:  # the fused gate and the presets: the full size only
                self.results["probes"] = report
                return
            # the V6.1 roadmap's signal fusion: a gate over the safety probe, the similarity, its trend and the
            # position, fitted on the training text; calibrated and judged like the probes
            from sedac_probes.fusion import evaluate_fusion, train_fusion

            d = self.out / "probes-fusion"
            train_fusion(self.work / "probe-data-enwiki", self.out / "probes-safety", d, log=self.log)
            ev = calibrate_probes(d, self.work / "probe-data-enwiki", max_risk=MAX_RISK, log=self.log,
                                  model_and_tokenizer=mt)
            held = evaluate_fusion(d, self.work / "probe-data-news", self.out / "probes-entropy", log=self.log)
            self.probes["fusion"] = load(d)
            from sedac_probes.bench import bench as probe_bench

            report["fusion"] = {"calibration": ev, "heldout_aurocs": held,
                                "training": self.probes["fusion"].meta["fusion"]["per_layer"],
                                "cost": probe_bench(self.model_dir, self.out / "probes-safety", 2048,
                                                    model_and_tokenizer=mt)}
            for strategy in ("conservative", "balanced", "aggressive"):
                d = self.work / f"probes-safety-{strategy}"
                if d.exists():
                    import shutil

                    shutil.rmtree(d)
                import shutil

                shutil.copytree(self.out / "probes-safety", d)
                report[f"preset_{strategy}"] = calibrate_probes(d, self.work / "probe-data-enwiki", strategy=strategy,
                                                                log=self.log)
                self.probes[f"preset_{strategy}"] = load(d)
        self.results["probes"] = report
