"""The store-and-forward edge agent and its wire protocol (``afc/v1/``).

:mod:`edge_agent.protocol` is the sans-I/O codec shared by the agent, the reference center
(:mod:`simulators.center`) and the tools; ``docs/protocol.md`` is its contract.
"""
