"""The lease engine's parts, one concept per module, along the flow a request takes:

- ``requests``: the durable request and its states (queued -> creating -> ready | ...);
- ``scheduler``: who is served next (fair order, backfilling) and ``eta``: when;
- ``queue``: how the engine opens, queues, serves and cancels a request;
- ``placement``: how many VMs fit and where each goes;
- ``lifecycle``: one VM's create (retries, moves) and destroy, through the provider;
- ``upkeep``: expiry, recovery after a process died, and reconcile.

``leases.LeaseService`` joins them with acquire and release. The machines come from a
``provider.Provider``; nothing here imports ``xen/``, and ``xen/`` imports nothing here.
"""
