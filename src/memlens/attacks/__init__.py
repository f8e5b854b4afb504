"""Attack stages: membership inference (:mod:`memlens.attacks.mia`, scores registered in
:mod:`memlens.attacks.registry`) and extraction. Import the submodule you need (nothing eager here)."""
