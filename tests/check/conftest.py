"""``relay check`` fixtures: the test CA, Dante and an echo server from the transport tests."""

from tests.transports.conftest import ca, ca_file, dante_proxy, echo_port

__all__ = ["ca", "ca_file", "dante_proxy", "echo_port"]
