"""The spec's rules of conditional computation (`routing: mod | dtf`, routing.py in each twin): called from spec.py's
`_check_rules` with the spec; one SpecError per broken rule, naming the field, its value and what was expected
(docs/routing.md)."""

from __future__ import annotations

from .config_file import INT32_MAX, SpecError


def check_routing_rules(s) -> None:
    """The routing fields' rules on `s`, a ModelSpec (not imported: spec.py imports this module)."""
    if not 0 < s.routing_capacity <= 1:
        raise SpecError(f"routing_capacity={s.routing_capacity} must be in (0, 1]")
    if s.dtf_prior_factor <= 0:
        raise SpecError(f"dtf_prior_factor={s.dtf_prior_factor} must be > 0")
    if not 1 <= s.dtf_window <= INT32_MAX:  # 10**23 was an OverflowError's traceback in both twins
        raise SpecError(f"dtf_window={s.dtf_window} must be in [1, {INT32_MAX:,}] (a window past every position "
                        "averages all of them)")
    if s.routing == "none":
        return
    if s.D % 2:
        raise SpecError(f"d_model={s.D} must be even when routing={s.routing} (the router predictor's width "
                        "is d_model/2)")
    if s.mixer != "attention":
        # predictor-mode decoding masks a skipped token's cached key/value; a GLA state has no slot to mask
        raise SpecError(f"routing={s.routing} routes attention blocks; mixer={s.mixer} is not routed")
    if s.routing == "dtf" and s.routing_layers != "every_other":
        raise SpecError("routing=dtf needs routing_layers=every_other (decision/dynamic block pairs), got "
                        f"{s.routing_layers}")
    if not s.routed_layers:
        raise SpecError(f"routing={s.routing} with routing_layers={s.routing_layers} needs n_layers >= 2, got {s.L}")
