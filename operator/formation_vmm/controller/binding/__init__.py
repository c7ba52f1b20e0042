"""Binding VMs to nodes: the Binder decides where each VM runs (and whether a change of a bound
VM's spec is admitted) and writes the binding; its pure collaborators keep the nodes and their
load (node_room), the quotas (quota_book), each VM's addresses, MACs and QEMU uid (identities),
where a leaving VM may go (migration_targets) and which nodes are lost (node_loss). How a Node
is read (nodes), which VmNetworks a VM may use (networks) and how a spec change is judged
(admission) are theirs too."""
