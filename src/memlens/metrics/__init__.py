"""Metrics: membership (ROC) metrics live in :mod:`memlens.metrics.roc`; text-overlap metrics in
:mod:`memlens.metrics.text`. Import the submodule you need (this package imports nothing eagerly)."""
