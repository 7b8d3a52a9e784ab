"""What a host name, a port and SLURM's values look like: the checks that keep config values
out of a shell.

Some launchers paste values into a line that a shell runs: DeepSpeed's pdsh runner writes
``--master_addr=VALUE`` unquoted into every node's remote command line, horovodrun puts host
names into an ``ssh HOST ...`` shell line, and a SLURM batch script holds ``#SBATCH`` lines and
paths. Such a value is either checked here to be what it is (a host name, an IP address, a
SLURM time or partition), which leaves no character a shell would read, or quoted where it is
written. No value written into a generated script may hold a control character: a newline
would end its line and start a command.

Pure: no imports beyond the standard library (the config and the launch builders share it).
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata

# RFC 1123 labels (letters, digits, hyphens inside), plus the underscore some clusters use;
# ASCII only ([0-9], not \d, which matches other scripts' digits).
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOST_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
_SCOPE_ID = re.compile(r"[A-Za-z0-9_.-]+")

# sbatch --time: "minutes", "minutes:seconds", "hours:minutes:seconds", "days-hours",
# "days-hours:minutes", "days-hours:minutes:seconds" (sbatch(1)), or no limit.
_SLURM_TIME = re.compile(
    r"[0-9]+(?::[0-9]+){0,2}|[0-9]+-[0-9]+(?::[0-9]+){0,2}|INFINITE|UNLIMITED", re.IGNORECASE
)
# A partition (or account) name as slurm.conf writes them; sbatch --partition takes a list.
_SLURM_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"
_SLURM_NAMES = re.compile(rf"{_SLURM_NAME}(?:,{_SLURM_NAME})*")


def is_host(value: str) -> bool:
    """True for a host name (RFC 1123, underscores allowed) or an IPv4/IPv6 address.

    Neither can hold a character a shell reads, start with ``-`` (an option to ssh), or be
    empty. An IPv6 scope (``fe80::1%eth0``) must be an interface name.
    """
    if not value or len(value) > 253:
        return False
    if _HOST_NAME.fullmatch(value) and not value.replace(".", "").isdigit():
        return True
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    scope = getattr(address, "scope_id", None)
    return scope is None or bool(_SCOPE_ID.fullmatch(scope))


def is_port(value: int) -> bool:
    """True for a TCP port a service can listen on (1-65535)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def is_slurm_time(value: str) -> bool:
    """True for a time limit in sbatch's own grammar (``--time``), e.g. ``04:00:00``,
    ``2-00:00:00``, ``90``."""
    return bool(_SLURM_TIME.fullmatch(value))


def is_slurm_names(value: str) -> bool:
    """True for a SLURM partition or account name, or a comma-separated list of them."""
    return bool(_SLURM_NAMES.fullmatch(value))


def control_characters(text: str) -> list[str]:
    """The control characters (and line or paragraph separators) in ``text``, as ``repr``s.

    Any of them in a generated script could end a line (a newline, a carriage return, a form
    feed) or hide what the line says.
    """
    found = []
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp") and char not in found:
            found.append(char)
    return [repr(char) for char in found]
