"""Plain-torch parallelism: memory planning and scaling projections, sharding-aware parameter access,
process groups and bounded barriers. The Composer-facing backend glue is :mod:`tread_scale.trainer.backends`.
"""
