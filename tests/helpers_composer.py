"""Stand-ins for Composer's ``State`` and ``Logger``: enough to apply an ``Algorithm`` (e.g. ``TREADRouting``)
to a model without a ``Trainer``."""


class FakeState:
    def __init__(self, model):
        self.model = model


class FakeLogger:
    """Keeps what ``log_hyperparameters`` was given in ``hparams``."""

    def __init__(self):
        self.hparams = {}

    def log_hyperparameters(self, d):
        self.hparams.update(d)
