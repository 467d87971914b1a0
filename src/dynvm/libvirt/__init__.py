"""libvirt/KVM as a provider: ``[libvirthostN]`` sections and real guests."""
