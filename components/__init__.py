"""Pipeline steps and the plumbing they share (config, storage, tracking, manifest, CLI)."""
