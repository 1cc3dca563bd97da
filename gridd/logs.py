"""Log observers for log shippers: ``twistd --logger gridd.logs.json gridd``.

twistd's ``--logger`` takes the name of a factory that returns the initial
log observer. :func:`json` writes one JSON object per event (Twisted's own
``jsonFileLogObserver`` format, loadable with ``eventsFromJSONLogFile``) to
the file named by ``$GRIDD_JSON_LOG``, or to standard output.
"""

from __future__ import annotations

import os
import sys

from twisted.logger import jsonFileLogObserver

__all__ = ["json"]


def json():
    path = os.environ.get("GRIDD_JSON_LOG")
    stream = open(path, "a", encoding="utf-8") if path else sys.stdout  # open as long as twistd runs
    return jsonFileLogObserver(stream)
