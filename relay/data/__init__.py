"""The data relay ships: provider profiles, address sets, throttle replies (package data).

``profiles.toml`` (provider limits: Genesys agentless, Exchange Online, Zendesk's
Exchange connector), ``address_sets.toml`` (NICE CXone sending ranges per region) and
``throttle_replies.toml`` (provider replies that mean "slow down", and what they pause)
are found with ``importlib.resources``, so a wheel, ``pip install .`` or ``pipx``
install reads them exactly as a source checkout does. No code lives here.
"""
