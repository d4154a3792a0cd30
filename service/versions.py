"""Which versions of a model a server loads: Triton's `version_policy`.

- `all`: every numeric version folder (the shipped repository's fp32 and int8 graphs side by
  side, so that a client may pin any of them);
- `latest:N`: the N highest-numbered versions; `latest:1` is the default, as in Triton: every
  version loaded costs each worker process a session's memory;
- `specific:V[,V…]`: exactly these versions; one that is not in the repository stops the server
  at start-up, since serving a different set than the operator asked for would be a silent change.

Versions a policy leaves out are not loaded at all (no session, no memory); a request that names
one gets 404 saying which policy left it out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

PolicyKind = Literal["all", "latest", "specific"]
_SYNTAX = "'all', 'latest:N' (N >= 1) or 'specific:V[,V...]'"


@dataclass(frozen=True)
class VersionPolicy:
    kind: PolicyKind = "all"
    num_versions: int = 0  # latest: how many of the newest versions
    versions: tuple[int, ...] = ()  # specific: which versions, ascending

    @classmethod
    def parse(cls, text: str) -> VersionPolicy:
        """`all` | `latest:N` | `specific:V[,V...]`; ValueError naming the syntax otherwise."""
        name, sep, arg = text.strip().partition(":")
        name, arg = name.strip().lower(), arg.strip()
        if name == "all" and not sep:
            return cls()
        if name == "latest" and arg.isdigit() and int(arg) >= 1:
            return cls("latest", num_versions=int(arg))
        if name == "specific" and arg:
            parts = [p.strip() for p in arg.split(",")]
            if all(p.isdigit() for p in parts):
                return cls("specific", versions=tuple(sorted({int(p) for p in parts})))
        raise ValueError(f"version policy {text!r} is not {_SYNTAX}")

    def select(self, available: Sequence[str], strict: bool = True) -> list[str]:
        """The versions to load out of `available` (numeric folder names), in ascending order.
        `strict` (start-up): ValueError when `specific` names a version that is not there;
        otherwise (a rescan while serving) the named versions that are there."""
        ordered = sorted(available, key=int)
        if self.kind == "all":
            return ordered
        if self.kind == "latest":
            return ordered[-self.num_versions :]
        by_number = {int(v): v for v in ordered}
        missing = [v for v in self.versions if v not in by_number]
        if missing and not strict:
            return [by_number[v] for v in self.versions if v in by_number]
        if missing:
            raise ValueError(
                f"version policy {self} names versions {missing} that are not in the repository "
                f"(available: {[int(v) for v in ordered]})"
            )
        return [by_number[v] for v in self.versions]

    LATEST_ONE: ClassVar[VersionPolicy]

    def triton(self) -> dict[str, dict[str, Any]]:
        """The policy as Triton's model configuration writes it (`version_policy`)."""
        if self.kind == "latest":
            return {"latest": {"num_versions": self.num_versions}}
        if self.kind == "specific":
            return {"specific": {"versions": list(self.versions)}}
        return {"all": {}}

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest:{self.num_versions}"
        if self.kind == "specific":
            return "specific:" + ",".join(map(str, self.versions))
        return "all"


VersionPolicy.LATEST_ONE = VersionPolicy("latest", num_versions=1)  # the default, Triton's
