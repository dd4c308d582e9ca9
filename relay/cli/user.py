"""`relay user add|del|list`: maintain the listeners' users file (scrypt hashes, mode 0600)."""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from pathlib import Path

from relay.cli.common import CONFIG_HELP, config_path
from relay.config.loader import load_config
from relay.config.values import OWNED_EXPECTED, is_owned
from relay.errors import ConfigError, RelayError
from relay.users import hash_password, parse_owns, read_entries, valid_name, write_users


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = sub.add_parser(
        "user", help="add, remove or list the users who may AUTH to relay",
        description="Maintain the users file that SMTP listeners check AUTH against. "
                    "A running relay notices changes at the next login.")
    verbs = parser.add_subparsers(dest="user_command", metavar="ACTION", required=True)
    add = verbs.add_parser("add", help="add a user or set a new password")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--password-stdin", action="store_true",
                     help="read the password from the first line of standard input")
    add.add_argument("--owns", metavar="LIST",
                     help="addresses and domains the user may send as, comma-separated "
                          "(alice@example.com,example.org,*.example.net); replaces the "
                          "user's list. Without it an existing user keeps its list")
    add.add_argument("--keep-password", action="store_true",
                     help="only change --owns of an existing user")
    delete = verbs.add_parser("del", help="remove a user")
    delete.add_argument("name", metavar="NAME")
    show = verbs.add_parser("list", help="list user names and what each owns")
    for p in (add, delete, show):
        p.add_argument("-c", "--config", metavar="FILE",
                       help=f"config file naming users_file; {CONFIG_HELP}")
        p.add_argument("-f", "--file", metavar="PATH",
                       help="users file to edit (instead of the config's users_file)")
        p.add_argument("-l", "--listener", metavar="NAME",
                       help="the listener whose users_file to edit, when several differ")
    add.set_defaults(func=add_command)
    delete.set_defaults(func=del_command)
    show.set_defaults(func=list_command)


def users_path(args: argparse.Namespace) -> Path:
    """The users file: --file, else the (one) users_file of the config's SMTP listeners."""
    if args.file:
        return Path(args.file)
    cfg_path = config_path(args.config)
    config = load_config(cfg_path, secrets=False)
    files = {lst.name: lst.users_file for lst in config.listeners
             if lst.users_file is not None and (not args.listener or lst.name == args.listener)}
    distinct = sorted({str(p) for p in files.values() if p is not None})
    if not distinct:
        which = f"listener {args.listener!r}" if args.listener else "no listener"
        raise ConfigError(f"{which} has a users_file", file=str(cfg_path),
                          hint="set users_file in the [[listener]], or pass --file PATH")
    if len(distinct) > 1:
        raise RelayError(f"listeners use different users files: {', '.join(distinct)}",
                         hint="choose one with --listener NAME or --file PATH")
    return Path(distinct[0])


def _load(path: Path) -> tuple[dict[str, str], dict[str, tuple[str, ...]]]:
    if not path.exists():
        return {}, {}
    entries = read_entries(path)
    return ({n: h for n, (h, _) in entries.items()},
            {n: o for n, (_, o) in entries.items() if o})


def _owns(text: str) -> tuple[str, ...]:
    owns = parse_owns(text)
    for item in owns:
        if not is_owned(item):
            raise RelayError(f"--owns: {item!r} is not an address or domain",
                             hint=f"give {OWNED_EXPECTED}")
    return owns


def _read_password(args: argparse.Namespace) -> bytes:
    if args.password_stdin:
        line = sys.stdin.readline()
        password = line[:-1] if line.endswith("\n") else line
        password = password[:-1] if password.endswith("\r") else password
    else:
        if not sys.stdin.isatty():
            raise RelayError(
                f"no terminal to ask for {args.name}'s password (standard input is not one)",
                hint=f"give it on standard input instead: printf '%s\\n' \"$PASSWORD\" | "
                     f"relay user add {args.name} --password-stdin")
        try:
            password = getpass.getpass(f"Password for {args.name}: ")
            again = getpass.getpass("Again: ")
        except EOFError:
            raise RelayError("no password given (end of input)",
                             hint="run the command again and type the password twice"
                             ) from None
        if again != password:
            raise RelayError("the passwords differ", hint="run the command again")
    if not password:
        raise RelayError("empty password refused", hint="give a password of 12+ characters")
    return password.encode("utf-8")


def add_command(args: argparse.Namespace) -> int:
    if not valid_name(args.name):
        raise RelayError(f"invalid user name {args.name!r}",
                         hint="names are printable, without spaces or ':'")
    path = users_path(args)
    users, owns = _load(path)
    existed = args.name in users
    if args.owns is not None:
        owns[args.name] = _owns(args.owns)
    if args.keep_password:
        if not existed or args.owns is None:
            raise RelayError("--keep-password changes --owns of an existing user",
                             hint=f"give --owns; {args.name!r} must already be in {path}")
    else:
        users[args.name] = hash_password(_read_password(args))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_users(path, users, owns)
    mode = stat.S_IMODE(os.stat(path).st_mode)
    print(f"{'updated' if existed else 'added'} {args.name} in {path} (mode {mode:04o})")
    if not owns.get(args.name):
        print(f"note: {args.name} owns no address; where sender_ownership = \"enforce\" "
              f"(the default for auth = \"required\") its mail is refused until "
              f"`relay user add {args.name} --keep-password --owns ADDRESS,...` "
              "(or [[account]] owns) lists what it may send as")
    return 0


def del_command(args: argparse.Namespace) -> int:
    path = users_path(args)
    users, owns = _load(path)
    if args.name not in users:
        print(f"relay: no user {args.name!r} in {path}", file=sys.stderr)
        return 1
    del users[args.name]
    write_users(path, users, owns)
    print(f"removed {args.name} from {path}")
    return 0


def list_command(args: argparse.Namespace) -> int:
    users, owns = _load(users_path(args))
    for name in sorted(users):
        print(f"{name}  owns: {', '.join(owns[name])}" if owns.get(name) else name)
    return 0
