"""key: the passphrase slots of an encrypted archive."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import click

from ..credentials import Login

if TYPE_CHECKING:
    from .. import keys  # loads SQLAlchemy: only when a key command runs

from .app import (
    _group,
    main,
    passphrase_options,
    passphrase_prompt,
    run,
)


@main.group("key")
def key_group() -> None:
    """Manage the passphrase slots of an encrypted archive; no message is touched."""


def new_passphrase_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """--new-passphrase-file, --new-passphrase-command (as `new`; MAILBACKUP_NEW_PASSPHRASE or a prompt otherwise)."""
    names = ["new_passphrase_file", "new_passphrase_command"]
    build = lambda **v: Login(password_file=v[names[0]], password_command=v[names[1]],  # noqa: E731
                              password_env="MAILBACKUP_NEW_PASSPHRASE")
    return _group("new", names, build, [
        click.option("--new-passphrase-file", names[0], type=click.Path(dir_okay=False), help="Read the new passphrase from this file."),
        click.option("--new-passphrase-command", names[1], metavar="CMD", help="Run CMD and use its output as the new passphrase."),
    ])(function)


def with_new(new: Login, action: Callable[[], Any]) -> Any:
    """Run action with the command's key source extended by the new passphrase."""
    from .. import keys

    source = replace(keys.current(), new_passphrase=new, new_prompt=passphrase_prompt("New archive passphrase", confirm=True))
    with keys.using(source):
        return run(False, action)


def manage_slots(archive: str, action: Callable[[Any, str], Any]) -> Any:
    from ..key_admin import manage  # the store modules load only for key commands

    return manage(archive, action)


@key_group.command("list")
@passphrase_options()
@click.argument("archive")
@click.option("--json", "json_output", is_flag=True, help="One JSON object per slot.")
def key_list_command(archive: str, json_output: bool) -> None:
    """List the key slots of ARCHIVE (no passphrase needed: slots hold no secret in clear)."""
    from .. import keys

    slots: list[keys.Slot] = run(json_output, lambda: manage_slots(archive, keys.list_slots))
    for slot in slots:
        if json_output:
            click.echo(json.dumps(slot.as_dict()))
        else:
            click.echo(f"{slot.id:>4}  {slot.kind:<10}  {slot.created_at}  {slot.params}")


@key_group.command("add")
@passphrase_options()
@new_passphrase_options
@click.argument("archive")
def key_add_command(archive: str, new: Login) -> None:
    """Add a slot for a new passphrase to ARCHIVE; the current one keeps working."""
    from .. import keys

    slot = with_new(new, lambda: manage_slots(archive, lambda e, w: keys.add_slot(e, keys.current(), w)))
    click.echo(f"added key slot {slot}")


@key_group.command("change")
@passphrase_options()
@new_passphrase_options
@click.argument("archive")
def key_change_command(archive: str, new: Login) -> None:
    """Replace the slot the current passphrase opens by one for the new passphrase."""
    from .. import keys

    slot = with_new(new, lambda: manage_slots(archive, lambda e, w: keys.change_slot(e, keys.current(), w)))
    click.echo(f"passphrase changed (now key slot {slot})")


@key_group.command("remove")
@passphrase_options()
@click.argument("archive")
@click.argument("slot_id", metavar="SLOT", type=int)
def key_remove_command(archive: str, slot_id: int) -> None:
    """Remove key slot SLOT (an id from 'key list'); never the last one."""
    from .. import keys

    run(False, lambda: manage_slots(archive, lambda e, w: keys.remove_slot(e, keys.current(), w, slot_id)))
    click.echo(f"removed key slot {slot_id}")


