"""gpg's status lines read into one verdict, the same for the head and the PC. The real gpg
and gpgv are run in test_releases.py and test_install.py; here the lines that are hard to
make with a throwaway key (a revoked key beside a valid signature, an old gpg's VALIDSIG)."""

from garage_node.core import gpgstatus

FPR = "A" * 40
PRIMARY = "B" * 40


def lines(*words: str) -> bytes:
    return "".join(f"[GNUPG:] {w}\n" for w in words).encode()


def test_a_good_signature_names_the_primary_key() -> None:
    v = gpgstatus.read(lines(f"GOODSIG {FPR[-16:]} op", f"VALIDSIG {FPR} 2026-12-06 1 0 4 0 22 10 01 {PRIMARY}"), 0)
    assert v.good and v.signer == PRIMARY


def test_an_old_gpg_without_the_primary_field_names_the_signing_key() -> None:
    assert gpgstatus.read(lines(f"VALIDSIG {FPR} 2026-12-06 1"), 0).signer == FPR


def test_a_revoked_key_spoils_a_valid_signature() -> None:
    v = gpgstatus.read(lines(f"REVKEYSIG {FPR[-16:]} op", f"VALIDSIG {FPR} 2026-12-06 1 0 4 0 22 10 01 {PRIMARY}"), 0)
    assert not v.good and v.stale_key and not v.changed


def test_a_changed_file_and_an_unknown_key_are_told_apart() -> None:
    assert gpgstatus.read(lines(f"BADSIG {FPR[-16:]} op"), 1).changed
    v = gpgstatus.read(lines(f"ERRSIG {FPR[-16:]} 1 10 00 1 9", f"NO_PUBKEY {FPR[-16:]}"), 2)
    assert v.unknown_key and v.missing_key == FPR[-16:] and not v.good


def test_a_nonzero_exit_is_never_good_and_other_output_is_ignored() -> None:
    assert not gpgstatus.read(b"gpg: some message\n" + lines(f"VALIDSIG {FPR} x 1 0 4 0 22 10 01 {PRIMARY}"), 2).good
    assert gpgstatus.read(b"", 0).words == frozenset()
