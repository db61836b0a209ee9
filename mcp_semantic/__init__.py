"""mcp-semantic: an MCP server of local LLM agents whose KV caches persist in safetensors."""

from mcp_semantic.blas import preload_openblas

# Before anything imports mlx.core: see blas.py for why.
preload_openblas()

__version__ = "0.1.0"
