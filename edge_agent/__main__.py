"""``python -m edge_agent --config agent.toml [--once]``: the agent without the ``afc`` wrapper
(service units and tests that SIGKILL it use this)."""

from tools.agent_cmd import main

if __name__ == "__main__":
    main()
