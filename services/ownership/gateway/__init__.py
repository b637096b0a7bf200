"""The Docker gateway: a default-deny admission chain in front of the real Docker socket.

framing (``relay``) -> route table (``routes``) -> references resolved by the daemon
(``daemon``) -> strict decode (``strict`` with ``fields``) -> policy (``policy``, pure) ->
forward the canonical request -> check Docker's own view (``verify``) -> relay the answer,
filtered to the caller (``filters``). ``admission`` strings the stages together.
"""
