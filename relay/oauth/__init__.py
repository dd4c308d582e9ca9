"""OAuth2 toward Microsoft and Google: token sources, explained errors, the small HTTPS client."""
