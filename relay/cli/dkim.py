"""`relay dkim keygen|check|verify`: make a key and its DNS record, check it, verify mail."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType

from relay.cli.dns_args import add_dns_args, resolver_from_args
from relay.config.values import is_domain, is_selector
from relay.dkim.keys import (
    MIN_RSA_BITS,
    generate,
    load_keys,
    txt_record,
    write_private_key,
    zone_line,
)
from relay.errors import ConfigError, DnsError, RelayError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser("dkim", help="DKIM keys and signatures",
                            description="Generate DKIM keys, check published records, verify.")
    verbs = parser.add_subparsers(dest="dkim_command", metavar="ACTION", required=True)

    kg = verbs.add_parser("keygen", help="write a new private key and print its DNS record")
    kg.add_argument("--domain", required=True, type=_domain,
                    help="the signing domain (d=), e.g. example.com")
    kg.add_argument("--selector", required=True, type=_selector,
                    help="the selector (s=), e.g. relay2026: letters, digits, - and _")
    kg.add_argument("--algorithm", choices=("rsa", "ed25519"), default="rsa")
    kg.add_argument("--bits", type=_rsa_bits, default=2048,
                    help=f"RSA key size: {MIN_RSA_BITS} (default) to {MAX_RSA_BITS}")
    kg.add_argument("--out", type=Path, metavar="FILE",
                    help="private key file (default SELECTOR.DOMAIN.pem); never overwritten")
    kg.set_defaults(func=keygen_command)

    ck = verbs.add_parser("check", help="does the published record match the configured key?")
    ck.add_argument("domain", metavar="DOMAIN")
    add_dns_args(ck)
    ck.set_defaults(func=check_command)

    vf = verbs.add_parser("verify", help="verify every DKIM signature of a message file")
    vf.add_argument("file", type=Path, metavar="FILE.eml")
    add_dns_args(vf)
    vf.set_defaults(func=verify_command)


MAX_RSA_BITS = 8192


def _domain(text: str) -> str:
    domain = text.strip().lower().rstrip(".")
    if not is_domain(domain):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a domain name: letters, digits and hyphens in dot-separated "
            "labels, e.g. example.com")
    return domain


def _selector(text: str) -> str:
    if not is_selector(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a DKIM selector: letters, digits, - and _ in dot-separated "
            "labels, e.g. relay2026")
    return text


def _rsa_bits(text: str) -> int:
    try:
        bits = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of bits") from None
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise argparse.ArgumentTypeError(
            f"{bits} bits is out of range: RSA keys for DKIM need at least {MIN_RSA_BITS} "
            f"bits (RFC 8301; receivers reject shorter ones) and at most {MAX_RSA_BITS} "
            "(a longer key's DNS record gets unwieldy); the default is 2048")
    return bits


def keygen_command(args: argparse.Namespace) -> int:
    domain = args.domain
    out: Path = args.out or Path(f"{args.selector}.{domain}.pem")
    key = generate(args.algorithm, args.bits)
    try:
        write_private_key(key, out)
    except FileExistsError:
        raise RelayError(f"{out} already exists; not overwriting a key",
                         hint="choose another --out, or a new --selector for key rotation"
                         ) from None
    except OSError as exc:
        raise RelayError(f"cannot write {out}: {exc.strerror}") from None
    name = f"{args.selector}._domainkey.{domain}"
    value = txt_record(key)
    algorithm = "ed25519-sha256" if args.algorithm == "ed25519" else "rsa-sha256"
    print(f"private key written to {out} (mode 0600)")
    print()
    print("Publish this DNS TXT record:")
    print(f"  name:  {name}")
    print(f"  value: {value}")
    print()
    print("Zone file form (strings of at most 255 characters):")
    print(f"  {zone_line(name, value)}")
    print()
    print("Config:")
    print(f'  [[dkim]]\n  domain = "{domain}"\n  selector = "{args.selector}"\n'
          f'  key_file = "{out}"\n  algorithm = "{algorithm}"')
    return 0


def check_command(args: argparse.Namespace) -> int:
    resolver, config = resolver_from_args(args, need_config=True)
    assert config is not None
    domain = args.domain.lower().rstrip(".")
    entries = [d for d in config.dkim if d.domain.lower().rstrip(".") == domain]
    if not entries:
        raise ConfigError(f"no [[dkim]] key for {domain} in {config.source}",
                          hint=f"generate one: relay dkim keygen --domain {domain} "
                               "--selector SELECTOR")
    bad = 0
    for key in load_keys(entries):
        name = key.record_name
        try:
            records = resolver.txt(name)
        except DnsError as exc:
            print(f"{name}: lookup failed: {exc}")
            bad += 1
            continue
        dkim_records = [r for r in records if b"p=" in r]
        if not dkim_records:
            print(f"{name}: NOT PUBLISHED; publish:\n  {zone_line(name, key.record())}")
            bad += 1
            continue
        try:
            published = verify_module().public_key(dkim_records[0])
        except ValueError as exc:
            print(f"{name}: published record is unusable ({exc}); publish:\n"
                  f"  {zone_line(name, key.record())}")
            bad += 1
            continue
        if _same(published, key.private.public_key()):
            print(f"{name}: ok ({key.algorithm}, matches {key.key_file})")
        else:
            print(f"{name}: MISMATCH: the published key is not the one in {key.key_file}; "
                  f"publish:\n  {zone_line(name, key.record())}")
            bad += 1
    return 1 if bad else 0


def verify_module() -> ModuleType:
    """relay.dkim.verify, imported on first use: it loads dkimpy, which every `relay`
    command (the long-running `relay run` among them) would otherwise carry in memory
    because each command's arguments are registered at start."""
    from relay.dkim import verify
    return verify


def _same(a: object, b: object) -> bool:
    from cryptography.hazmat.primitives import serialization

    def raw(k: object) -> bytes:
        return k.public_bytes(serialization.Encoding.DER,  # type: ignore[attr-defined, no-any-return]
                              serialization.PublicFormat.SubjectPublicKeyInfo)
    return raw(a) == raw(b)


def verify_command(args: argparse.Namespace) -> int:
    try:
        data = args.file.read_bytes()
    except OSError as exc:
        raise RelayError(f"cannot read {args.file}: {exc.strerror}") from None
    resolver, _config = resolver_from_args(args, need_config=False)
    results = verify_module().verify(data, lookup=resolver.txt)
    if not results:
        print(f"{args.file}: no DKIM-Signature")
        return 1
    for r in results:
        print(r)
    sys.stdout.flush()
    return 0 if all(r.result == "pass" for r in results) else 1
