"""Jobs: config, schemas, Ray Data graphs, CLI, storage, metrics, weights bundle."""
