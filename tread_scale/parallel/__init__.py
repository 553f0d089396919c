"""Parallelism backends (DDP, FSDP2, DeepSpeed ZeRO) and sharding-aware parameter access."""
