"""The scheduler: queues, leases, connected workers and matching, as pure logic.

It is driven by events (requests from connections, answers from the store)
and by an injected clock; it speaks to connections only through
:class:`gridd.scheduler.connection.IConnection`, a small interface of actions
in its own words, and to durable state only through the store interface
(``gridd.store.base.IStore``). Nothing in it frames a line or opens a socket.

One module per noun, each stating the rules it owns at its top:

- ``model``: a job, its lease and a worker, with their states;
- ``queue``: the run queue and matching;
- ``leases``: granting, fencing and ending leases, run-time limits;
- ``results``: checking and committing per-record results;
- ``workers``: connected workers, their handshake and heartbeat deadlines;
- ``control``: operators' changes of jobs and workers;
- ``poison``: poison jobs, and workers flagged for the types they fail;
- ``watchers``: who is told of which job's changes;
- ``shared``: this server's beat and its look at what other servers on the
  same store did;
- ``views``: read-only answers for clients and operators;
- ``rates``: counts over time and failures said once;
- ``dispatcher``: the object that wires them together.
"""

from gridd.scheduler.connection import IConnection, JobOffer, JobStatus
from gridd.scheduler.dispatcher import Dispatcher
from gridd.scheduler.model import parse_version
from gridd.scheduler.rates import RateCounter

__all__ = ["Dispatcher", "IConnection", "JobOffer", "JobStatus", "RateCounter", "parse_version"]
