"""Every error Attune raises on purpose. Messages say what was wrong and what to do.

    AttuneError
    ├── InvalidEventError      an event or batch failed validation; the store is unchanged
    ├── ModelMismatchError     parameters differ from the expected names/shapes/dtypes/version
    │   └── SignatureError     a global model is unsigned or its signature does not verify
    ├── StoreError             the on-device store is unusable (wrong schema, corrupt file)
    │   └── WrongKeyError      the store's encryption key is missing or wrong; nothing was changed
    ├── ConfigError            invalid configuration
    ├── DataError              a dataset file is missing or malformed
    └── PrivacyError           a contribution failed the mechanism's own bound check; nothing was sent
"""

from __future__ import annotations


class AttuneError(Exception):
    """Base of every error Attune raises on purpose."""


class InvalidEventError(AttuneError, ValueError):
    """An event (or one event of a batch) failed validation. Nothing was stored."""


class ModelMismatchError(AttuneError, ValueError):
    """Received parameters do not match the model this code expects."""


class SignatureError(ModelMismatchError):
    """A global model is unsigned, tampered, replayed or signed by another key; it was not used."""


class StoreError(AttuneError):
    """The on-device store cannot be used as it is."""


class WrongKeyError(StoreError):
    """The store is encrypted under another key (or none was given). Nothing was read or changed."""


class ConfigError(AttuneError, ValueError):
    """A configuration value is invalid."""


class DataError(AttuneError, ValueError):
    """A dataset is missing or malformed."""


class PrivacyError(AttuneError):
    """A contribution fell outside the bounds its accounting assumes; it was not sent."""
