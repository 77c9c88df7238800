"""Benchmarks: `python -m bench.run` (make bench) compares the TrainingJob operator with the
batch/v1 Job controller on one local control plane with kwok GPU nodes; trainer_bench.py
is the trainer's CPU micro-benchmark."""
