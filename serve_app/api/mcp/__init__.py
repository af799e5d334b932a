"""MCP tools (the official `mcp` SDK, stateless streamable HTTP) over the same services."""
