"""The outside world: settings, storage, tracking, local stack."""
