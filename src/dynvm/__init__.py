"""dynvm: disposable VMs on XenServer / XCP-ng hosts for CI pipelines."""

__version__ = "0.1.0"
