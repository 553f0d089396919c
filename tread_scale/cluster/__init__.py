"""Cluster helpers used by the Slurm recipes and the container entrypoint."""
