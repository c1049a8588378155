"""Errors a user can fix. Each message names the problem and the fix; the CLI exits 2 on them."""


class AutoQRAError(ValueError):
    """Bad input: the message says what is wrong and what to do instead."""


class SpaceError(AutoQRAError):
    """A configuration or search space that does not fit the model or the allowed levels."""


class BudgetError(AutoQRAError):
    """A memory budget that cannot be parsed or that no configuration fits."""


class ModelLoadError(AutoQRAError):
    """A model that cannot be found or has no decoder blocks to quantize."""


class DatasetError(AutoQRAError):
    """A dataset that cannot be found, is malformed or is too small."""


class CandidateFailed(RuntimeError):
    """A candidate that diverged (NaN/inf loss) or ran out of memory; the search records it and goes on."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class DeviceError(AutoQRAError):
    """A device or compute dtype this machine does not have (e.g. 'cuda:7' without 7 GPUs, 'tpu')."""
