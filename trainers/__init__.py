"""Pure-PyTorch self-supervised trainers: losses, heads, backbones, methods, evaluation.

Nothing in this package imports Ray or MLflow; the orchestrator wraps it.
"""
