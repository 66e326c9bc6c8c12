"""Experiment tracking in MLflow (an optional extra, ``cxrlearn[mlflow]``): ``--mlflow URI`` checked before any
work (:func:`check_tracking`), the MLflow run a training run logs into (``RUN/mlflow.json``), and an evaluation
logged into that same run (:func:`log_evaluation`). Training's own logging goes through Lightning's MLFlowLogger
(:mod:`cxrlearn.workflows.train`)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from cxrlearn._files import read_json_object
from cxrlearn.errors import ConfigError
from cxrlearn.evaluation.results import EvaluationMetrics
from cxrlearn.model.bundle import bundle_digest
from cxrlearn.records import Record

MLFLOW_RUN = "mlflow.json"
#: The MLflow experiment cxrlearn's runs are logged in.
EXPERIMENT = "cxrlearn"


class MlflowRun(Record):
    """``RUN/mlflow.json``: the MLflow run a resumed run, and its evaluations, log into."""

    tracking_uri: str | None = None
    experiment_id: str | None = None
    run_id: str | None = None


def allow_file_store(uri: str) -> None:
    """MLflow 3 keeps file stores in maintenance mode and refuses them unless told; a team's tracking server (or a
    database store) is the long-term home, a folder the simplest one to start with."""
    if uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


#: Tracking URIs MLflow stores runs at: a folder, a tracking server, Databricks, a database.
TRACKING_SCHEMES = ("", "file", "http", "https", "databricks", "sqlite", "postgresql", "mysql", "mssql")
#: How long ``--mlflow``'s server has to answer before any work starts (MLflow itself retries for minutes).
TRACKING_TIMEOUT_S = 5


def check_tracking(uri: str | None) -> None:
    """``--mlflow URI``, checked before any work, each problem one line: a scheme MLflow stores runs at, a folder
    that can be one, a server that answers (within :data:`TRACKING_TIMEOUT_S`), Databricks configured, and MLflow
    (an optional extra) installed."""
    if not uri:
        return
    scheme = urllib.parse.urlsplit(uri).scheme.lower() if "://" in uri or uri.startswith("file:") else ""
    if ":" in uri and not scheme and uri.split(":", 1)[0].lower() not in ("", "databricks"):
        scheme = uri.split(":", 1)[0].lower()
    if uri.lower() == "databricks" or uri.lower().startswith("databricks:"):
        scheme = "databricks"
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(f"--mlflow {uri[:100]}: not a tracking URI MLflow can store runs at (a folder, file:PATH, "
                          f"http(s)://SERVER, databricks, or a database URL)")
    if scheme in ("", "file"):
        folder = Path(urllib.parse.urlsplit(uri).path if scheme == "file" else uri).expanduser().absolute()
        if folder.parts[:2] in (("/", "proc"), ("/", "sys"), ("/", "dev")):
            raise ConfigError(f"--mlflow {uri}: {folder} is a system folder, not one to store runs in")
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"--mlflow {uri}: {folder} is a file; MLflow stores runs in a folder")
    elif scheme in ("http", "https"):
        _reach_tracking_server(uri)
    elif scheme == "databricks" and not (os.environ.get("DATABRICKS_HOST")
                                         or Path("~/.databrickscfg").expanduser().is_file()):
        raise ConfigError(f"--mlflow {uri}: Databricks is not configured (no DATABRICKS_HOST and no "
                          f"~/.databrickscfg): run `databricks configure`, or set DATABRICKS_HOST and DATABRICKS_TOKEN")
    if importlib.util.find_spec("mlflow") is None:
        raise ConfigError(f"--mlflow {uri}: MLflow is not installed; install the extra: pip install 'cxrlearn[mlflow]'")


def _reach_tracking_server(uri: str) -> None:
    """A tracking server that answers its health check (or at least answers, below HTTP 500) in time."""
    health = uri.rstrip("/") + "/health"
    try:
        with urllib.request.urlopen(health, timeout=TRACKING_TIMEOUT_S) as answer:
            answer.read(64)
    except urllib.error.HTTPError as err:
        if err.code >= 500:
            raise ConfigError(f"--mlflow {uri}: the tracking server answered HTTP {err.code} ({err.reason}); "
                              f"check the server, or log to a folder (--mlflow file:./mlruns)") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(f"--mlflow {uri}: no tracking server answers there within {TRACKING_TIMEOUT_S} s "
                          f"({reason}); start it (mlflow server ...), or log to a folder (--mlflow file:./mlruns)"
                          ) from None


def git_commit() -> str | None:
    """The commit of the cxrlearn checkout this runs from (an editable install), or None (an installed package)."""
    source = Path(__file__).resolve().parents[3]
    if not (source / ".git").exists():
        return None
    try:
        done = subprocess.run(["git", "-C", str(source), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def recorded_run(run_dir: Path) -> MlflowRun | None:
    """The MLflow run ``train --mlflow`` made for ``run_dir``, or None."""
    saved = run_dir / MLFLOW_RUN
    if not saved.is_file():
        return None
    return MlflowRun.model_validate(read_json_object(saved, ConfigError, "delete it to log into a new MLflow run"))


def log_evaluation(uri: str, run_dir: Path, metrics: EvaluationMetrics, out: Path) -> str:
    """``evaluate --mlflow URI``: the evaluation's mean AUC (with its interval) and per-finding AUCs as metrics
    named after its folder (``eval/<out>/mean_auc``), the bundle's digest as it is now (thresholds change it), and
    the report, metrics and predictions as artifacts, into the MLflow run of the training run where
    ``train --mlflow`` logged to the same URI, else into a new run named after the run folder. The run's id."""
    from mlflow.tracking import MlflowClient

    allow_file_store(uri)
    client = MlflowClient(tracking_uri=uri)
    recorded = recorded_run(run_dir)
    if recorded is not None and recorded.run_id and recorded.tracking_uri == uri:
        run_id = recorded.run_id
    else:
        experiment = client.get_experiment_by_name(EXPERIMENT)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(EXPERIMENT)
        run_id = client.create_run(experiment_id, run_name=f"{run_dir.name} evaluation").info.run_id
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", out.name) or "evaluation"
    values = {f"eval/{name}/mean_auc": metrics.mean_auc}
    if metrics.mean_auc_ci95:
        values[f"eval/{name}/mean_auc_ci95_low"], values[f"eval/{name}/mean_auc_ci95_high"] = metrics.mean_auc_ci95
    values.update({f"eval/{name}/auc/{finding}": auc for finding, auc in metrics.auc.items() if auc is not None})
    for key, value in values.items():
        if value is not None:
            client.log_metric(run_id, key, float(value))
    client.set_tag(run_id, "model_sha256", bundle_digest(run_dir))
    client.set_tag(run_id, f"eval/{name}/subset", metrics.subset[:5000])
    client.log_artifacts(run_id, str(out), artifact_path=f"evaluation/{name}")
    if recorded is None or recorded.run_id != run_id:
        client.set_terminated(run_id)
    return run_id
