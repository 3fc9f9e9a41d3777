"""The main job on the embedded default: generated logs through every stage that exists, day by day."""
from __future__ import annotations

import datetime as dt
import time
from pathlib import Path

from jobs import generate, stages
from synergen_core.config import Config, parse_ds


def days(cfg: Config) -> list[str]:
    first = parse_ds(cfg.generate.start_ds)
    return [(first + dt.timedelta(days=i)).isoformat() for i in range(cfg.generate.days)]


def run_default(cfg: Config) -> dict:
    root = Path(cfg.lake.root).resolve()
    t0 = time.perf_counter()
    generated = generate.run(cfg, cfg.generate.start_ds)
    group = f"synergen-run-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}"
    per_day = {}
    for ds in days(cfg):
        per_day[ds] = {"validate": stages.validate_raw(cfg, ds, group=group),
                       "sessionize": stages.sessionize(cfg, ds, group=group)}
    return {
        "lake": str(root),
        "generated": generated,
        "days": per_day,
        "outputs": {
            "validated": str(root / "validated"),
            "quarantine": str(root / "quarantine"),
            "sessionized": str(root / cfg.sessionize.output),
            "mlflow": cfg.mlflow.tracking_uri,
            "mlflow_ui": f"{Path('.venv/bin/mlflow')} ui --backend-store-uri {cfg.mlflow.tracking_uri} --host 127.0.0.1",
        },
        "seconds": round(time.perf_counter() - t0, 1),
    }
