"""uniscene-jax: multi-camera occupancy pre-training (UniScene) in JAX/Flax."""
