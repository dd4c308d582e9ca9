"""Fixtures for transport tests: a test CA, a Dante proxy, an echo server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.peers.dante import Dante, dante
from tests.transports.helpers import echo_server


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path


@pytest.fixture(scope="module")
def dante_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dante]:
    with dante(tmp_path_factory.mktemp("dante")) as d:
        yield d


@pytest.fixture(scope="module")
def echo_port() -> Iterator[int]:
    with echo_server() as port:
        yield port
