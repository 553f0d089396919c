"""Composer-facing glue of the sharding backends: FSDP2 through Composer, DeepSpeed ZeRO integrated by us.

The plain-torch side of parallelism (memory planning, scaling projection, process groups) is
:mod:`tread_scale.parallel`; DDP needs no glue (Composer wraps the model itself).
"""
