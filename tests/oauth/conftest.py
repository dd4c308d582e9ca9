"""OAuth test fixtures: the test CA and Dante from the transport tests."""

from tests.transports.conftest import ca, ca_file, dante_proxy, echo_port

__all__ = ["ca", "ca_file", "dante_proxy", "echo_port"]
