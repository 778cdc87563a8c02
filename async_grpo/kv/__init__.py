"""kv subpackage."""
