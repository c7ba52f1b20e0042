"""VmImages on a node: fetch, verify, convert and cache; pure parsing apart from the I/O."""
