"""The lease engine's parts, one concept per module, along the flow a request takes:

- ``requests``: the durable request and its states (queued -> creating -> ready | ...);
- ``scheduler``: who is served next (fair order, backfilling) and ``eta``: when;
- ``queue``: how the engine queues, serves and cancels a waiting request;
- ``upkeep``: expiry, recovery after a process died, and reconcile.

``leases.LeaseService`` joins them with acquire, create and release; ``capacity`` counts
room and places VMs; ``xen/`` does everything that speaks xapi.
"""
