"""confguard: removes one party from a live Genesys Cloud conference when a compliance rule fires."""

__version__ = "0.1.0"
