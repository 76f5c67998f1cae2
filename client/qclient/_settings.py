"""Where the default client finds the broker: `configure()`'s arguments, else a Django
project's `QBROKER` setting, else the environment (QBROKER_URL, QBROKER_TOKEN).

    # settings.py of a Django project
    QBROKER = {"URL": "http://broker:7733", "TOKEN": env("QBROKER_TOKEN")}

Django is read only when it is already imported or DJANGO_SETTINGS_MODULE is set, and
only when the default client is first made: importing qclient never imports Django.
"""

from __future__ import annotations

import os
import sys
from typing import Any

__all__ = ["DJANGO_KEYS", "django_options"]

#: QBROKER's keys and the Client arguments they set
DJANGO_KEYS = {
    "URL": "url",
    "TOKEN": "token",
    "TIMEOUT": "timeout",
    "RETRIES": "retries",
    "ENCODING": "encoding",
    "CA": "ca",
}


def django_options() -> dict[str, Any]:
    """The Client arguments of Django's `settings.QBROKER`, or {} outside Django.

    Raises:
        ValueError: QBROKER is not a dict, or has a key not in DJANGO_KEYS.
    """
    if "django" not in sys.modules and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return {}
    try:
        from django.conf import settings
        from django.core.exceptions import ImproperlyConfigured
    except ImportError:
        return {}
    try:
        given = getattr(settings, "QBROKER", None)
    except ImproperlyConfigured:  # DJANGO_SETTINGS_MODULE unset, settings unconfigured
        return {}
    if given is None:
        return {}
    if not isinstance(given, dict):
        raise ValueError(f"settings.QBROKER must be a dict, not {type(given).__name__}")
    unknown = sorted(set(given) - set(DJANGO_KEYS))
    if unknown:
        raise ValueError(
            f"settings.QBROKER has unknown keys {unknown}; use {sorted(DJANGO_KEYS)}"
        )
    return {DJANGO_KEYS[key]: value for key, value in given.items()}
