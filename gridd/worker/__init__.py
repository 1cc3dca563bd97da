"""The gridd worker: runs the jobs a gridd server pushes to it.

``core`` keeps the leases and results across connections, ``runner`` runs
one job's records through its job type, ``protocol`` is the wire adapter,
``service`` builds the service tree and ``tap`` is ``twistd gridworker``.
"""
