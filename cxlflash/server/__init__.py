"""The shared driver: one process owns the driver, others reach it over a
Unix socket.

Today the owner is the process that created an embedded ``Adapter``, and
the others are the children it forks: each child talks to its parent's
driver over a socket pair made at ``fork()``, so a child can attach its own
context and ``clone_after_fork()`` its parent's virtual LUNs, as with the
kernel.  A request is the ioctl number plus the structure's bytes, sent
with ``SCM_CREDENTIALS`` so the owner knows the caller's pid; a reply is
the errno plus the structure's bytes, with file descriptors passed by
``SCM_RIGHTS`` (the adapter fd) and a replica of the caller's context
tables, so the data path stays in the child: it reads and writes the
backing store, inherited at fork, directly.

``protocol``  message framing, credentials and descriptor passing
``service``   the owner's side: one thread per child connection
``client``    the child's side: requests and the table replicas
"""
