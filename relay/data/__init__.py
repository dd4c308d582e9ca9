"""The data relay ships: provider profiles and named address sets, read as package data.

``profiles.toml`` (provider limits: Genesys agentless, Exchange Online, Zendesk's
Exchange connector) and ``address_sets.toml`` (NICE CXone sending ranges per region)
are found with ``importlib.resources``, so a wheel, ``pip install .`` or ``pipx``
install reads them exactly as a source checkout does. No code lives here.
"""
