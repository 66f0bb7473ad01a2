"""The config mechanism's registries: the name lists, sections and presets the layers above fill.

config.py checks `objective.method` and `data.source` against these tables and composes the run's
Config from the sections registered here, without importing the code that registers them (it sits
above the config layer): each method folder's MethodSpec registers its config sections, presets,
renamed keys and checks (`register_method`, called by ldae_fast/methods/__init__.py), and each
data source its name and what it reads (`register_source`, ldae_fast/data/registry.py).

Whoever parses or builds a config imports `ldae_fast.methods` first, which loads both. A config
built before that fails at once with `RegistryNotLoaded`, which names the import: never a config
silently without its methods' sections.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class RegistryNotLoaded(RuntimeError):
    """A config was built or parsed before the registries were filled: a programming error."""


@dataclass(frozen=True)
class SourceKind:
    """What the config needs to know of a data source to check a config against it."""

    name: str
    """The value of data.source that selects it."""
    sharded: bool
    """Reads shards (so data.epoch_size must be given)."""
    images: bool
    """Yields images (data.num_frames = 0)."""
    video: bool
    """Yields clips (data.num_frames > 0)."""


# objective.method -> its MethodSpec (duck-typed here: name, sections, presets, renamed, took_over,
# validate, video).
METHODS: dict[str, Any] = {}
# Section name -> dataclass, of every registered method (a section two methods share is one entry).
SECTIONS: dict[str, type] = {}
# Preset name -> overrides; the dict object config.PRESETS is, filled in place.
PRESETS: dict[str, dict[str, Any]] = {}
# Old 'section.field' spellings -> their new ones (saved configs and command lines still read);
# a field two methods took over (objective.mask_ratio) maps to each one's.
RENAMED: dict[str, list[str]] = {}
# objective.method -> {'section.field' of another method's section it read before it had its own
# field: that field}; a stored config of that method reads the old key into the new one.
TOOK_OVER: dict[str, dict[str, str]] = {}
# data.source -> SourceKind.
SOURCES: dict[str, SourceKind] = {}
_PRESET_OWNER: dict[str, str] = {}


def register_method(spec: Any) -> None:
    """Register one method: its name (objective.method), its config sections (MethodSpec.sections),
    presets, renamed keys, fields taken over from another method's section, relation checks and
    video flag. Registering the same spec again (a module reloaded) replaces it; a section, preset
    or old key another registration owns differently is an error, raised here, at import."""
    for sec, typ in spec.sections.items():
        if SECTIONS.get(sec, typ) is not typ:
            raise ValueError(f"method {spec.name!r}: config section {sec!r} is taken")
    for name in spec.presets:
        if _PRESET_OWNER.get(name, spec.name) != spec.name:
            raise ValueError(f"method {spec.name!r}: preset name {name!r} is taken by {_PRESET_OWNER[name]!r}")
    for old, new in spec.renamed.items():
        if new.partition(".")[0] not in spec.sections:
            raise ValueError(f"method {spec.name!r}: old key {old!r} maps to {new!r}, outside its sections")
    took_over = dict(getattr(spec, "took_over", {}))
    for old, new in took_over.items():
        if new.partition(".")[0] not in spec.sections or old.partition(".")[0] in spec.sections:
            raise ValueError(f"method {spec.name!r}: took over {old!r} into {new!r}: the old key must lie "
                             "outside its sections and the new one inside")
    METHODS[spec.name] = spec
    SECTIONS.update(spec.sections)
    TOOK_OVER[spec.name] = took_over
    for old, new in spec.renamed.items():
        if new not in RENAMED.setdefault(old, []):
            RENAMED[old].append(new)
    for name, over in spec.presets.items():
        PRESETS[name] = over  # type: ignore[assignment]
        _PRESET_OWNER[name] = spec.name


def register_source(kind: SourceKind) -> None:
    """Register one data source's name and what it reads."""
    SOURCES[kind.name] = kind


def require_loaded() -> None:
    """Raise RegistryNotLoaded unless the methods and the data sources have registered."""
    missing = [what for what, table in (("method", METHODS), ("data source", SOURCES)) if not table]
    if missing:
        raise RegistryNotLoaded(
            f"no {' and no '.join(missing)} is registered with the config mechanism: import "
            "ldae_fast.methods before building or reading a Config (it registers every method's config "
            "sections, names and presets, and the data sources)")


__all__ = ["METHODS", "PRESETS", "RENAMED", "RegistryNotLoaded", "SECTIONS", "SOURCES", "SourceKind", "TOOK_OVER",
           "register_method", "register_source", "require_loaded"]
