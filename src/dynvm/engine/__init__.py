"""The lease engine's parts that follow a request through its life: the durable request
(``requests``), its place and ETA in the queue (``eta``), and who is served next
(``scheduler``)."""
