"""What provisioning refuses to do."""

from __future__ import annotations


class ProvisionError(RuntimeError):
    """Provisioning cannot go on; the message says what is wrong and what to do."""
