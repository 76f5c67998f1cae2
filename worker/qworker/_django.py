"""qworker inside a Django project: Django set up before the task modules are imported,
and the broker taken from where the project keeps it (qclient.client_options()).

`qworker --django-settings proj.settings` (or DJANGO_SETTINGS_MODULE in the
environment) calls `django.setup()` first, in the worker and in each pool child, so
tasks may import models and use the ORM.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import qclient

__all__ = ["setup_django", "worker_client"]


def setup_django() -> bool:
    """Set Django up (once per process) when DJANGO_SETTINGS_MODULE is set.

    Returns:
        Whether Django is set up.

    Raises:
        ImportError: DJANGO_SETTINGS_MODULE is set but Django is not installed, or the
            settings module does not import; the caller reports it.
    """
    if not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return False
    import django
    from django.apps import apps

    if not apps.ready:
        django.setup()
    return True


def worker_client(
    url: str | None, token: str | None, ca: str | None, **options: Any
) -> qclient.Client:
    """The worker's Client: `url`, `token` and `ca` where given, else qclient's own
    settings (`configure()`, a Django QBROKER dict, the environment), with the
    worker's `options` (its timeout and retries) on top."""
    import qclient  # here: importing qworker (and its registry) stays light

    settings = qclient.client_options()
    settings.update(options)
    if url is not None:
        settings["url"] = url
    if token is not None:
        settings["token"] = token
    if ca is not None:
        settings["ca"] = ca
    return qclient.Client(**settings)
