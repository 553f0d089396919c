"""Typed exceptions. Each carries enough context to name the key, file, shard or shape at fault."""


class TreadScaleError(Exception):
    """Base class of every error tread_scale raises on purpose."""


class ConfigError(TreadScaleError, ValueError):
    """A configuration value is unknown, missing, ill-typed or out of range."""


class RouteError(ConfigError):
    """A TREAD route is malformed or does not fit the model."""


class DatasetError(TreadScaleError):
    """Input data cannot be read or converted."""


class DatasetMismatchError(DatasetError):
    """The dataset's stored facts (shape, dtype, classes) disagree with the model config."""


class ObjectStoreError(TreadScaleError):
    """Object storage is unreachable, misconfigured or lacks credentials."""


class CheckpointError(TreadScaleError):
    """A checkpoint or weight file is missing, malformed or unsafe to load."""


class DataStallError(DatasetError):
    """A wait in the data path (a shard, a download, a peer) passed its bound (``data.stall_timeout``)."""


class DistributedTimeoutError(TreadScaleError):
    """A collective (a barrier at the start or end of training) passed its bound; names the absent ranks."""


class PeerFailedError(TreadScaleError):
    """A collective failed because a peer rank left or is stuck; names the peer where it can."""
