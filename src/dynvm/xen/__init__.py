"""Talking to Xen hosts: sessions, the live inventory, and creating and destroying VMs.

Nothing here knows about leases or HTTP.
"""
