"""Live migration, both halves: the source's and the target's work, the relay that carries
libvirt's three streams between agents over TLS, and the judge of what a source may ask of the
target's libvirtd."""
