"""Frozen option sets shared by the library API and the CLI. Validation raises ``ConfigError``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import ConfigError

EXECUTION_FORMS = ("fused", "factorized", "sandwich", "spatial_first", "temporal_first")
EXECUTION_MODES = (*EXECUTION_FORMS, "auto")
DECOMPOSITION_METHODS = ("hooi", "hosvd", "tensorly")


@dataclass(frozen=True)
class AtomSpec:
    """Number of temporal (m_t) and spatial (m_s) atoms chosen for one layer."""

    temporal: int
    spatial: int

    def __post_init__(self) -> None:
        if self.temporal < 1 or self.spatial < 1:
            raise ConfigError(f"atoms must be ≥ 1, got temporal={self.temporal}, spatial={self.spatial}")


@dataclass(frozen=True)
class ConvertConfig:
    """How ranks are chosen and which layers are converted.

    Exactly one rank policy applies:
    - ``atoms`` (default): ``spatial_atoms`` (default 6) and ``temporal_atoms`` (default min(L, 3)),
      clipped per layer to its number of taps;
    - ``energy``: per mode, the smallest rank keeping that share of the squared singular values;
    - ``budget``: ranks across layers so the converted layers' weights shrink to that share;
    - ``full_rank``: m_t = L, m_s = Kh·Kw (exact; for verification).
    ``include``/``exclude`` are fnmatch globs on module names. Layers whose atoms would not save
    parameters are skipped (except under ``full_rank``).
    """

    spatial_atoms: int | None = None
    temporal_atoms: int | None = None
    energy: float | None = None
    budget: float | None = None
    full_rank: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    method: str = "hooi"
    mode: str = "auto"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        for name in ("spatial_atoms", "temporal_atoms"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                flag = "--atoms" if name == "spatial_atoms" else "--temporal-atoms"
                raise ConfigError(f"{flag} must be a positive number of atoms, got {value}", f"e.g. {flag} 6")
        policies = [
            name
            for name, active in (
                ("--energy", self.energy is not None),
                ("--budget", self.budget is not None),
                ("--full-rank", self.full_rank),
            )
            if active
        ]
        if len(policies) > 1:
            raise ConfigError(f"{' and '.join(policies)} cannot be combined", "choose one rank policy")
        if policies and (self.spatial_atoms is not None or self.temporal_atoms is not None):
            raise ConfigError(
                f"{policies[0]} cannot be combined with --atoms/--temporal-atoms", "choose one rank policy"
            )
        if self.energy is not None and not 0.0 < self.energy <= 1.0:
            raise ConfigError(f"--energy must be in (0, 1], got {self.energy}", "e.g. --energy 0.99")
        if self.budget is not None and not 0.0 < self.budget <= 1.0:
            raise ConfigError(f"--budget must be in (0, 1], got {self.budget}", "e.g. --budget 0.5")
        if self.method not in DECOMPOSITION_METHODS:
            raise ConfigError(f"unknown --method {self.method!r}", f"use one of {', '.join(DECOMPOSITION_METHODS)}")
        if self.mode not in EXECUTION_MODES:
            raise ConfigError(f"unknown --mode {self.mode!r}", f"use one of {', '.join(EXECUTION_MODES)}")
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))

    @property
    def policy(self) -> str:
        """One of ``atoms``, ``energy``, ``budget``, ``full_rank``."""
        if self.full_rank:
            return "full_rank"
        if self.energy is not None:
            return "energy"
        if self.budget is not None:
            return "budget"
        return "atoms"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["include"] = list(self.include)
        data["exclude"] = list(self.exclude)
        data.pop("extra")
        data["policy"] = self.policy
        return data
