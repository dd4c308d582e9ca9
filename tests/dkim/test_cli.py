"""`relay dkim keygen|check|verify` end to end, against dnsmasq."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from relay.cli import main
from relay.config.schema import DkimKeyConfig, HostPort
from relay.dkim.keys import DkimKeys, load_keys, txt_record
from relay.dkim.sign import Signer
from tests.peers.dnsmasq import Zone, dnsmasq

MSG = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: t\r\n\r\nhello\r\n"


def keygen(tmp: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[Path, str]:
    out = tmp / f"key{len(list(tmp.iterdir()))}.pem"
    assert main(["dkim", "keygen", "--domain", "Example.com", "--selector", "s1",
                 "--out", str(out), *extra]) == 0
    return out, capsys.readouterr().out


@pytest.mark.fast
@pytest.mark.parametrize(("algo", "k"), [("rsa", "rsa"), ("ed25519", "ed25519")])
def test_keygen_writes_0600_key_and_prints_record(tmp_path: Path, algo: str, k: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    path, out = keygen(tmp_path, capsys, "--algorithm", algo)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert "name:  s1._domainkey.example.com" in out
    algorithm = "rsa-sha256" if algo == "rsa" else "ed25519-sha256"
    [key] = load_keys([DkimKeyConfig("example.com", "s1", path, algorithm)])  # type: ignore[arg-type]
    assert f"value: {txt_record(key.private)}" in out
    assert f"v=DKIM1; k={k}; p=" in out
    zone = next(line for line in out.splitlines() if "IN TXT" in line)
    strings = zone.split("( ", 1)[1].rsplit(" )", 1)[0].split('" "')
    assert all(len(s.strip('"')) <= 255 for s in strings)
    assert "".join(s.strip('"') for s in strings) == txt_record(key.private)


@pytest.mark.fast
def test_keygen_refuses_overwrite_and_small_keys(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    path, _ = keygen(tmp_path, capsys)
    before = path.read_bytes()
    assert main(["dkim", "keygen", "--domain", "example.com", "--selector", "s1",
                 "--out", str(path)]) == 1
    assert "already exists" in capsys.readouterr().err
    assert path.read_bytes() == before
    with pytest.raises(SystemExit) as exc:        # the CLI's own usage error
        main(["dkim", "keygen", "--domain", "example.com", "--selector", "s1",
              "--out", str(tmp_path / "small.pem"), "--bits", "1024"])
    assert exc.value.code == 2
    assert "at least 2048" in capsys.readouterr().err
    assert not (tmp_path / "small.pem").exists()


def config_file(tmp: Path, dns: HostPort, keys: list[tuple[str, Path, str]]) -> Path:
    text = (f'[relay]\nhostname = "relay.test"\nspool = "{tmp / "spool"}"\n'
            f'default_upstream = "outbox"\ndns_servers = ["{dns.host}:{dns.port}"]\n'
            f'dns_timeout = "2s"\n\n'
            f'[[listener]]\nname = "local"\nprotocol = "smtp"\nlisten = "127.0.0.1:2525"\n'
            f'auth = "none"\nallow = ["127.0.0.0/8"]\n\n'
            f'[[upstream]]\nname = "outbox"\nprotocol = "outbox"\npath = "{tmp / "out"}"\n')
    for selector, path, algorithm in keys:
        text += (f'\n[[dkim]]\ndomain = "example.com"\nselector = "{selector}"\n'
                 f'key_file = "{path}"\nalgorithm = "{algorithm}"\n')
    conf = tmp / "relay.toml"
    conf.write_text(text)
    return conf


def test_check_and_verify(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rsa_path, _ = keygen(tmp_path, capsys)
    ed_path, _ = keygen(tmp_path, capsys, "--algorithm", "ed25519")
    other_path, _ = keygen(tmp_path, capsys)
    keys = load_keys([DkimKeyConfig("example.com", "s1", rsa_path),
                      DkimKeyConfig("example.com", "e1", ed_path, "ed25519-sha256"),
                      DkimKeyConfig("example.com", "s2", other_path)])
    rsa, ed, _other = list(keys)
    zone = Zone(domains=["example.com"], txt={
        "s1._domainkey.example.com": rsa.record(),
        "e1._domainkey.example.com": ed.record(),
        "s2._domainkey.example.com": rsa.record(),      # wrong key published for s2
    })
    with dnsmasq(tmp_path, zone) as dns:
        good = config_file(tmp_path, dns, [("s1", rsa_path, "rsa-sha256"),
                                           ("e1", ed_path, "ed25519-sha256")])
        assert main(["dkim", "check", "example.com", "-c", str(good)]) == 0
        out = capsys.readouterr().out
        assert "s1._domainkey.example.com: ok" in out and "e1._domainkey.example.com: ok" in out

        bad = config_file(tmp_path, dns, [("s1", rsa_path, "rsa-sha256"),
                                          ("s2", other_path, "rsa-sha256"),
                                          ("s3", other_path, "rsa-sha256")])
        assert main(["dkim", "check", "example.com", "-c", str(bad)]) == 1
        out = capsys.readouterr().out
        assert "s2._domainkey.example.com: MISMATCH" in out
        assert "s3._domainkey.example.com: NOT PUBLISHED" in out

        assert main(["dkim", "check", "example.org", "-c", str(good)]) == 1
        assert "no [[dkim]] key for example.org" in capsys.readouterr().err

        eml = tmp_path / "m.eml"
        eml.write_bytes(Signer(DkimKeys([rsa, ed])).sign(MSG, sender_domain="example.com"))
        assert main(["dkim", "verify", str(eml), "--dns", f"{dns.host}:{dns.port}"]) == 0
        out = capsys.readouterr().out
        assert "dkim=pass header.d=example.com header.s=s1 header.a=rsa-sha256" in out
        assert "dkim=pass header.d=example.com header.s=e1 header.a=ed25519-sha256" in out
        eml.write_bytes(eml.read_bytes().replace(b"hello", b"HELLO"))
        assert main(["dkim", "verify", str(eml), "-c", str(good)]) == 1
        assert out.count("dkim=pass") == 2
        assert capsys.readouterr().out.count("body hash mismatch") == 2
