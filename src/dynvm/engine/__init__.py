"""The lease engine's parts, one concept per module, along the flow a request takes:

- ``queue``: the way in (accept, queue, grant, cancel); ``admission``: whether a request
  may have VMs, and the one lock-and-place transaction that gives it room;
- ``queue_policy``: the fair order and whether serving now delays the head; ``scheduler``:
  the leader's pass over the queue; ``eta``: when a waiting request is forecast to fit;
- ``placement``: how many VMs fit and where each goes; ``capacity``: what the hosts hold;
- ``build``: a request's VMs made, held and handed over together; ``creator``: one VM's
  attempts and moves; ``tracker``: their progress in the request's row;
- ``release``: every end of a lease; ``upkeep``: expiry, recovery and reconcile;
- ``ready_pools``, ``ready_stock``, ``sizing``: VMs made ahead of demand;
- ``claim``: whether this database is the installation; ``context``: what they share.

``service.LeaseService`` assembles them. The lease and request states are ``states.py``'s.
The machines come from a ``provider.Provider``; nothing here imports ``xen/``, and ``xen/``
imports nothing here.
"""
