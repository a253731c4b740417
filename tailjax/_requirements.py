"""The pinned requirements (``requirements.lock``) this installation came from, for the
run manifest. (The lock of a working directory, ``runrecord.LOCK``, is another thing.)

``requirements.lock`` (repo root) pins the exact version, and the hashes, of
every package the test suite passed with; ``make install`` installs from it.
:func:`lock_info` finds it beside the package in a checkout (editable install)
and reports its sha256 and whether the installed versions still match it.
Installed elsewhere (a wheel in site-packages) there is no lock: ``None``.
"""

from __future__ import annotations

import hashlib
import re
from importlib import metadata
from pathlib import Path

LOCK_NAME = "requirements.lock"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def _canonical(name: str) -> str:
  return re.sub(r"[-_.]+", "-", name).lower()


def find_lock_file() -> Path | None:
  """``<checkout>/requirements.lock`` when this package runs from a checkout, else None."""
  root = Path(__file__).resolve().parents[1]
  lock = root / LOCK_NAME
  return lock if lock.is_file() and (root / "pyproject.toml").is_file() else None


def read_pins(path: str | Path) -> dict[str, str]:
  """``{canonical name: version}`` of the ``name==version`` lines of a pip lock file."""
  pins = {}
  for line in Path(path).read_text().splitlines():
    m = _PIN.match(line.strip())
    if m:
      pins[_canonical(m.group(1))] = m.group(2)
  return pins


def lock_info() -> dict:
  """The lock this installation came from.

  Returns:
    ``{"lock_file": path or None, "sha256": hex digest or None, "mismatches": [...] or None}``;
    ``mismatches`` lists ``"name: lock X, installed Y"`` for every locked package
    whose installed version differs (``installed None`` when absent), so a run
    whose environment drifted from the lock says so.
  """
  path = find_lock_file()
  if path is None:
    return {"lock_file": None, "sha256": None, "mismatches": None}
  mismatches = []
  for name, want in sorted(read_pins(path).items()):
    try:
      have = metadata.version(name)
    except metadata.PackageNotFoundError:
      have = None
    if have is None or have.split("+")[0] != want.split("+")[0]:
      mismatches.append(f"{name}: lock {want}, installed {have}")
  return {"lock_file": str(path), "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
          "mismatches": mismatches}
