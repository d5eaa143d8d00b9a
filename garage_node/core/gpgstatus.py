"""What gpg or gpgv said about a detached signature, read from its machine-readable status
lines (`--status-fd`), never from its messages for people, which change between versions and
languages. Shared by the head (`gpg --verify` when a release is added) and the PC (`gpgv`
before an update is written), so both judge a signature by the same rules."""

from __future__ import annotations

from dataclasses import dataclass

# Any of these, even beside a VALIDSIG, and the signature is not taken.
_SPOILERS = frozenset({"BADSIG", "ERRSIG", "EXPKEYSIG", "REVKEYSIG", "EXPSIG"})


@dataclass(frozen=True)
class Verdict:
    signer: str  # the primary key's fingerprint when the signature is good, else ""
    words: frozenset[str]  # the status keywords seen (GOODSIG, BADSIG, NO_PUBKEY, ...)
    missing_key: str  # the key id of NO_PUBKEY, "" if none

    @property
    def good(self) -> bool:
        return bool(self.signer)

    @property
    def changed(self) -> bool:
        """The data or the signature was changed after signing."""
        return "BADSIG" in self.words

    @property
    def unknown_key(self) -> bool:
        return "NO_PUBKEY" in self.words

    @property
    def stale_key(self) -> bool:
        """An expired or revoked key, or an expired signature."""
        return bool(self.words & {"EXPKEYSIG", "REVKEYSIG", "EXPSIG"})


def read(stdout: bytes, returncode: int) -> Verdict:
    status = [line.split()[1:] for line in stdout.decode("utf-8", "replace").splitlines()
              if line.startswith("[GNUPG:] ") and len(line.split()) > 1]
    words = frozenset(s[0] for s in status)
    valid = [s for s in status if s[0] == "VALIDSIG"]
    signer = ""
    if returncode == 0 and valid and not words & _SPOILERS:
        # VALIDSIG's last field is the primary key's fingerprint (gnupg's doc/DETAILS); older
        # gpg without it: the signing key's own, its first field.
        signer = valid[0][-1] if len(valid[0]) >= 10 else valid[0][1]
    missing = next((s[1] for s in status if s[0] == "NO_PUBKEY" and len(s) > 1), "")
    return Verdict(signer=signer, words=words, missing_key=missing)
