"""bamray orchestrator: CLI, config, Ray Train / Tune wiring, MLflow tracking, cluster files."""
