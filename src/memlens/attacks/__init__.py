"""The attacks: membership inference over one scoring pass (:mod:`~memlens.attacks.registry` and the modules
that register attacks in it), reference adapters, extraction and exposure, the privacy audit.

Importing the package registers every attack, so :data:`~memlens.attacks.registry.ATTACKS` is complete
wherever the registry is used."""

from memlens.attacks import finetuned, learned, likelihood, lira_rmia, recall  # noqa: F401  (register their attacks)
