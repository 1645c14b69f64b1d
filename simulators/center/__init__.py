"""The reference center: ingest workers, configuration publisher, commands, reconciliation.

It is what tests, the demo and a small city run against a real Mosquitto (``afc sim center``):
:mod:`.ingest` stores signed transaction batches exactly once and acks them,
:mod:`.publisher` signs and publishes retained configuration bundles, :mod:`.commands` sends
signed commands and awaits replies, :mod:`.report` reconciles devices, cards and (with
:mod:`.dealer`) the dealers' top-ups against the credit allowances the center issued, and
:mod:`.store` keeps it all behind :class:`~.store.CenterStore` (SQLite by default).
The wire format is :mod:`edge_agent.protocol` (``docs/protocol.md``).
"""
