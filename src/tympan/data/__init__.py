"""Dataset adapters, the manifest contract, splits and the built-in demo generator."""
