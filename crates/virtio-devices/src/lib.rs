//! virtio device models and the virtio-pci transport
