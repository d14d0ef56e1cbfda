"""What a doctor run found: one result per step, a verdict, and how to print it.

The JSON shape is stable (programs and the API depend on it):

    {"subject": "host" | "vm", "vm_id": str | null,
     "verdict": "OK" | "WARN" | "FAIL", "hop": str | null, "cause": str | null,
     "summary": str, "evidence": [str], "fix": str, "seconds": float,
     "hops": [{"hop", "status": "ok"|"warn"|"fail"|"skipped", "checked": [str], "cause", "summary",
               "evidence": [str], "fix", "seconds"}]}

`hop`, `cause`, `evidence` and `fix` at the top are those of the first failing step (or, when
none fails, of the first warning). Steps are named after the hops in vm/hops.py; the host's
own pieces, which no VM hop covers, are `host.netns`, `host.bridge`, `host.forwarding`,
`host.firewall`, `host.uplink`, `host.vmm`, `host.kernel` and `host.image`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from browservm.doctor.causes import fix as fix_for

OK = "ok"
WARN = "warn"
FAIL = "fail"
SKIPPED = "skipped"

HOST_NETNS = "host.netns"
HOST_BRIDGE = "host.bridge"
HOST_FORWARDING = "host.forwarding"
HOST_FIREWALL = "host.firewall"
HOST_UPLINK = "host.uplink"
HOST_VMM = "host.vmm"
HOST_KERNEL = "host.kernel"
HOST_IMAGE = "host.image"
HOST_NETWORK_PIECES = (HOST_NETNS, HOST_BRIDGE, HOST_FORWARDING, HOST_FIREWALL, HOST_UPLINK)


@dataclass
class Finding:
    """Something wrong: its cause code, a sentence, and what proves it."""

    cause: str
    summary: str
    evidence: list[str] = field(default_factory=list)
    fatal: bool = True  # False: a warning (the path to the desktop still works)


@dataclass
class HopResult:
    hop: str
    status: str = OK
    checked: list[str] = field(default_factory=list)
    cause: str | None = None
    summary: str = ""
    evidence: list[str] = field(default_factory=list)
    fix: str = ""
    seconds: float = 0.0

    def found(self, finding: Finding) -> None:
        """Take `finding` as this step's outcome, unless an earlier, graver one is already there."""
        status = FAIL if finding.fatal else WARN
        if self.status == FAIL or (self.status == WARN and status == WARN):
            self.evidence.append(f"also: {finding.cause}: {finding.summary}")
            self.evidence += finding.evidence
            return
        self.status, self.cause, self.summary = status, finding.cause, finding.summary
        self.evidence = finding.evidence + self.evidence
        self.fix = fix_for(finding.cause)

    def to_json(self) -> dict[str, Any]:
        return {"hop": self.hop, "status": self.status, "checked": self.checked, "cause": self.cause,
                "summary": self.summary, "evidence": self.evidence, "fix": self.fix,
                "seconds": round(self.seconds, 4)}


@dataclass
class Report:
    subject: str  # "host" or "vm"
    vm_id: str | None
    hops: list[HopResult]
    seconds: float = 0.0

    @property
    def first(self) -> HopResult | None:
        """The step the verdict is about: the first failure, else the first warning."""
        return next((h for h in self.hops if h.status == FAIL), None) or next(
            (h for h in self.hops if h.status == WARN), None)

    @property
    def verdict(self) -> str:
        first = self.first
        return "OK" if first is None else ("FAIL" if first.status == FAIL else "WARN")

    def hop(self, name: str) -> HopResult:
        return next(h for h in self.hops if h.hop == name)

    def verdict_line(self) -> str:
        first = self.first
        if first is None:
            what = f"VM {self.vm_id}" if self.vm_id else "host"
            return f"OK {what}: every step passed ({len([h for h in self.hops if h.status == OK])} checked)"
        return f"{self.verdict} {first.hop}: {first.summary}"

    def to_json(self) -> dict[str, Any]:
        first = self.first
        return {"subject": self.subject, "vm_id": self.vm_id, "verdict": self.verdict,
                "hop": first.hop if first else None, "cause": first.cause if first else None,
                "summary": self.verdict_line(), "evidence": first.evidence if first else [],
                "fix": first.fix if first else "", "seconds": round(self.seconds, 4),
                "hops": [h.to_json() for h in self.hops]}


def render_text(report: Report) -> str:
    """The verdict line, the evidence and the fix, then every step with what it checked and how long it took."""
    lines = [report.verdict_line()]
    first = report.first
    if first is not None:
        if first.evidence:
            lines.append("evidence:")
            lines += [f"  {line}" for line in first.evidence]
        if first.fix:
            lines.append(f"fix: {first.fix}")
    lines.append("")
    for hop in report.hops:
        mark = {OK: "ok", WARN: "WARN", FAIL: "FAIL", SKIPPED: "-"}[hop.status]
        head = f"{mark:<5} {hop.hop:<17} {hop.seconds * 1000:7.1f} ms"
        if hop.status in (FAIL, WARN):
            head += f"  {hop.cause}: {hop.summary}"
        lines.append(head)
        lines += [f"{'':<33}checked: {item}" for item in hop.checked]
        if hop is not first and hop.status in (FAIL, WARN):
            lines += [f"{'':<33}{line}" for line in hop.evidence]
    lines.append(f"\n{report.seconds:.2f} s")
    return "\n".join(lines)
