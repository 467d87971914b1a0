"""A XenAPI simulator that speaks xapi's XML-RPC protocol.

It imports nothing from the rest of dynvm, and dynvm imports nothing from it: the two
meet only over the wire, as dynvm and a real Xen host would.
"""
