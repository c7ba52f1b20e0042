"""VMs leaving their node: live migrations scheduled and their binding moved (migrations), a
drain's moves and restarts (drain), and the VMs of a node given up for lost started elsewhere
when they allow it (lost_nodes). Each asks the binding package where a VM may go."""
