"""The shared driver: one process runs the driver, others reach it over a
Unix socket -- the children an embedded adapter's process forks (over a
socket pair made at ``fork()``) and any process on the host when the
driver is a ``cxlflash serve`` daemon.  One protocol for both.

``wire``     the messages: a fixed binary header, the uapi structures,
             table updates in a fixed layout; credentials and descriptors
``service``  the driver's side: ``Server``, one thread per connection,
             a reaper that releases what a dead process held
``client``   the client's side: the channel and the table replicas its
             data path uses
``daemon``   ``cxlflash serve``: the service around a ``Server``
"""
