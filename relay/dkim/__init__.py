"""DKIM: sign outgoing mail, load and make keys, verify signatures."""
