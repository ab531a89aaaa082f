"""``codes export --out``: codes are as good as money, so the file is the
owner's alone and never written through a symlink."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from issuance.shared.backoffice.catalog import BackOfficeError
from issuance.shared.backoffice.commands import open_export


def test_a_new_export_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "batch.csv"
    with open_export(str(path), force=False) as out:
        out.write(b"code\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes() == b"code\n"


def test_an_existing_file_is_replaced_only_with_force(tmp_path: Path) -> None:
    path = tmp_path / "batch.csv"
    path.write_bytes(b"old and longer\n")
    path.chmod(0o644)
    with pytest.raises(BackOfficeError, match=r"exists.*--force"):
        open_export(str(path), force=False)
    assert path.read_bytes() == b"old and longer\n"
    with open_export(str(path), force=True) as out:
        out.write(b"new\n")
    assert path.read_bytes() == b"new\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


@pytest.mark.parametrize("force", [False, True])
def test_a_symlink_is_never_followed(tmp_path: Path, force: bool) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"precious\n")
    link = tmp_path / "batch.csv"
    link.symlink_to(target)
    with pytest.raises(BackOfficeError, match=r"symbolic link|exists"):
        open_export(str(link), force=force)
    assert target.read_bytes() == b"precious\n"
    dangling = tmp_path / "dangling.csv"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(BackOfficeError):
        open_export(str(dangling), force=force)
    assert not (tmp_path / "nowhere").exists()
