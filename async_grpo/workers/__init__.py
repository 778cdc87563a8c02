"""workers subpackage."""
