"""A real local Kubernetes control plane (etcd, kube-apiserver, kube-controller-manager) for the
tests and for ``vmm dev up``, started the way controller-runtime's envtest does it."""
