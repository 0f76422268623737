//! pci (work in progress)
