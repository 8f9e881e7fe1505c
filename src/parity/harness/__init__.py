"""What runs and launches the checks: toy models and batches, the patch and e2e runners, the
hang-safe launcher, probes and fingerprints, the benchmark, multi-process check workers and the
planted faults of the negative controls."""
