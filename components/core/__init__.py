"""Plumbing every step shares and no step owns: config, storage, tracking, the runner, the
manifest and latent formats, training, model artifacts, media I/O, hardware measurements.
Nothing here imports a step."""
