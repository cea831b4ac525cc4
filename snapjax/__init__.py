"""snapjax: Snapshot Ensembles (Huang et al., ICLR 2017) in JAX/Flax."""
