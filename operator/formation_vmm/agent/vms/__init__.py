"""A VM of this node and its domain, brought in line: the VM controller (events in, syncs out),
the sync and the reconciler that carry out ``plan()``, the inputs a domain is built from (images,
Secrets, disks, seed), the status written back, how QEMU runs (its uid and group, its
confinement), and each VM's series on ``/metrics``."""
