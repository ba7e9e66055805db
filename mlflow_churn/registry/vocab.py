"""The registry's vocabularies: what a gate, a canary and a signed decision may say.

Each is a :class:`enum.StrEnum`: a member *is* its string (``GateVerdict.PASSED ==
"passed"``, ``json.dumps`` and MLflow tags write ``passed``), so tags, metrics and JSON
written with them are byte-identical to the bare strings of earlier releases, and a value
read back from a tag compares equal to its member. Compare with the members, never with
string literals.

- :class:`GateVerdict`: the gate's decision on a challenger (version tag ``gate``, the
  signed ``gate`` decision).
- :class:`CanaryVerdict`: the canary analysis's verdict (version tag ``canary_decision``,
  the signed ``canary`` decision; also the action the canary judge's verdict maps to).
- :class:`SignedKind`: the kinds of signed decision (version tags ``churn.sig.<kind>``).
"""

from __future__ import annotations

from enum import StrEnum


class GateVerdict(StrEnum):
    """The gate's decision on a challenger: ``passed`` (it goes to ``canary``) | ``rejected``."""

    PASSED = "passed"
    REJECTED = "rejected"

    @classmethod
    def of(cls, passed: bool) -> GateVerdict:
        """``PASSED`` when ``passed``, else ``REJECTED``."""
        return cls.PASSED if passed else cls.REJECTED


class CanaryVerdict(StrEnum):
    """The canary's verdict on live traffic: ``promote`` (it may become champion) | ``wait``
    (not enough evidence yet) | ``rollback`` (it served worse: take it off)."""

    PROMOTE = "promote"
    WAIT = "wait"
    ROLLBACK = "rollback"


class SignedKind(StrEnum):
    """The kinds of signed decision on a version (tag ``churn.sig.<kind>``): ``gate``,
    ``canary``, ``rollback``, ``override``, ``approval`` and ``rollout`` (the canary's rollout
    weight, signed by the controller)."""

    GATE = "gate"
    CANARY = "canary"
    ROLLBACK = "rollback"
    OVERRIDE = "override"
    APPROVAL = "approval"
    ROLLOUT = "rollout"
