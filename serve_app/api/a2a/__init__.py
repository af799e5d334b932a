"""The A2A agent (the official `a2a-sdk`): its Agent Card and JSON-RPC routes; tasks are jobs."""
