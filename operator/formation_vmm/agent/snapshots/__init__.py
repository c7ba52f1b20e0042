"""VmSnapshots and VmRestores of this node's VMs: taking them (live or offline), restoring them,
and the index of what each VM has."""
